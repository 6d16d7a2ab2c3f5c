"""Image fidelity against the reference renders (same prompts and seeds): PSNR, SSIM and, where its backbone's
weights are already on this machine, LPIPS, all from torchmetrics. Nothing is ever downloaded for it."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

from qwendoctor.errors import UsageError

# Thresholds every image must meet (the worst image, hence the mean too). On an H100 (synthetic weights, benchmarks/) a bf16 regional
# compile kept 43-47 dB against eager and FP8 row-wise 38-41 dB against bf16: lossless admits the first,
# balanced both; fast leaves room for fewer steps and caches.
FLOOR_PRESETS = {
    "lossless": (40.0, 0.98),
    "balanced": (30.0, 0.90),
    "fast": (22.0, 0.75),
}
# LPIPS with AlexNet features, torchmetrics' default and the one the LPIPS authors recommend as a metric.
LPIPS_NET = "alex"
FLOOR_HELP = "one of lossless, balanced, fast, or psnr=DB,ssim=S,lpips=L (any of the three)"
# The PSNR an image identical to its reference counts at. PSNR is infinite there, and an infinite image in a
# mean made the whole set pass whatever its other images looked like (an untouched image beside a 2-step one).
# 100 dB is beyond any lossy setting measured (bf16 compile 43-47 dB, FP8 38-41 dB) and is a float-rounding
# difference of about 1e-5 in [0, 1], so a floor at or below it is met by an identical image and no other way.
PSNR_CEILING_DB = 100.0


class NonFiniteImage(ValueError):
    """An image with NaN or infinite pixels: no fidelity can be stated for it; the trial that made it failed."""


@dataclasses.dataclass(frozen=True)
class Floor:
    name: str
    psnr_db: float
    ssim: float
    lpips: float | None = None  # the largest mean LPIPS allowed (lower is closer); None: not a floor metric

    def violations(self, results: dict[str, Any]) -> dict[str, float]:
        """Optuna constraint values by metric: feasible when every entry is <= 0. Each metric is judged on the
        mean and on the worst image (`psnr_db_min`, `ssim_min`, `lpips_max` where the results have them), so
        one good image cannot carry a bad one; a non-finite figure is a violation, never a pass."""
        found = {"psnr": self.psnr_db - _worst(results, "psnr_db", "psnr_db_min", min),
                 "ssim": self.ssim - _worst(results, "ssim", "ssim_min", min)}
        if self.lpips is not None:
            found["lpips"] = _worst(results, "lpips", "lpips_max", max) - self.lpips
        return {metric: value if math.isfinite(value) else math.inf for metric, value in found.items()}

    def describe(self) -> str:
        parts = [f"PSNR >= {self.psnr_db:g} dB", f"SSIM >= {self.ssim:g}"]
        return ", ".join(parts + ([f"LPIPS <= {self.lpips:g}"] if self.lpips is not None else []))


def _worst(results: dict[str, Any], mean: str, worst: str, pick) -> float:
    values = [float(results[key]) for key in (mean, worst) if results.get(key) is not None]
    if any(math.isnan(value) for value in values):
        return math.nan
    return pick(values)


def parse_floor(text: str) -> Floor:
    """A preset name, or `psnr=DB,ssim=S,lpips=L` (any part may be left out). An LPIPS floor needs LPIPS here."""
    if text in FLOOR_PRESETS:
        return Floor(text, *FLOOR_PRESETS[text])
    psnr_db, ssim, lpips = 0.0, -1.0, None
    try:
        for part in text.split(","):
            key, value = part.split("=")
            key = key.strip().lower()
            if key == "psnr":
                psnr_db = float(value)
            elif key == "ssim":
                ssim = float(value)
            elif key == "lpips":
                lpips = float(value)
            else:
                raise ValueError(key)
    except ValueError:
        raise UsageError(f"--floor {text!r}: use {FLOOR_HELP}") from None
    if not -1 <= ssim <= 1:
        raise UsageError(f"--floor {text!r}: ssim must be in [-1, 1]")
    if lpips is not None:
        if not 0 <= lpips <= 1:
            raise UsageError(f"--floor {text!r}: lpips must be in [0, 1]")
        missing = lpips_unavailable()
        if missing:
            raise UsageError(f"--floor {text!r}: {missing}")
    return Floor(text, psnr_db, ssim, lpips)


def lpips_unavailable() -> str | None:
    """Why LPIPS cannot be measured here without a download (a one-line note), or None when it can."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return "LPIPS not measured: it needs torchvision (pip install torchvision) for its AlexNet features"
    path = lpips_backbone_path()
    if not os.path.exists(path):
        return (f"LPIPS not measured: the AlexNet weights are not in {path} (qwendoctor never downloads; fetch them "
                "once with: python -c 'import torchvision; torchvision.models.alexnet(weights=\"DEFAULT\")')")
    return None


def lpips_backbone_path() -> str:
    """Where torch keeps the AlexNet weights torchvision downloads (torch.hub's checkpoints directory)."""
    import torch
    from torchvision.models import AlexNet_Weights

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(AlexNet_Weights.DEFAULT.url))


@functools.lru_cache(maxsize=1)
def _lpips_metric():
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    # normalize=True: inputs in [0, 1], as the renders are.
    return LearnedPerceptualImagePatchSimilarity(net_type=LPIPS_NET, normalize=True).eval()


def lpips(a, b) -> float:
    """LPIPS of two (1, 3, H, W) float tensors in [0, 1]."""
    import torch

    with torch.inference_mode():
        return float(_lpips_metric()(a, b))


def compare(images, references, with_lpips: bool | None = None) -> dict[str, float]:
    """Mean and worst PSNR (dB), SSIM and, where available (`lpips_unavailable`), LPIPS of `images` against
    `references` (lists of HxWx3 arrays in [0, 1]). An identical image counts at PSNR_CEILING_DB; an image with a
    NaN or infinite pixel raises NonFiniteImage (no figure for it could be trusted, nor a mean with it)."""
    import numpy as np
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if len(images) != len(references):
        raise ValueError(f"{len(images)} images against {len(references)} references")
    if with_lpips is None:
        with_lpips = lpips_unavailable() is None
    psnrs, ssims, lpipss = [], [], []
    for index, (image, reference) in enumerate(zip(images, references)):
        if not np.isfinite(np.asarray(image, dtype=np.float32)).all():
            raise NonFiniteImage(f"image {index + 1} of {len(images)} has NaN or infinite pixels")
        a = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
        b = torch.from_numpy(np.asarray(reference, dtype=np.float32)).permute(2, 0, 1)[None]
        psnr = float(peak_signal_noise_ratio(a, b, data_range=1.0))
        psnrs.append(min(psnr, PSNR_CEILING_DB) if not math.isnan(psnr) else PSNR_CEILING_DB)
        ssims.append(float(structural_similarity_index_measure(a, b, data_range=1.0)))
        if with_lpips:
            lpipss.append(lpips(a, b))
    result = {
        "psnr_db": sum(psnrs) / len(psnrs),
        "psnr_db_min": min(psnrs),
        "ssim": sum(ssims) / len(ssims),
        "ssim_min": min(ssims),
    }
    if lpipss:
        result.update(lpips=sum(lpipss) / len(lpipss), lpips_max=max(lpipss))
    return result
