"""Image fidelity against the reference renders (same prompts and seeds): SSIM and PSNR from torchmetrics."""

from __future__ import annotations

import dataclasses
import math

from qwendoctor.errors import UsageError

# Thresholds on the mean over the prompt set. On an H100 (synthetic weights, benchmarks/) a bf16 regional
# compile kept 43-47 dB against eager and FP8 row-wise 38-41 dB against bf16: lossless admits the first,
# balanced both; fast leaves room for fewer steps and caches.
FLOOR_PRESETS = {
    "lossless": (40.0, 0.98),
    "balanced": (30.0, 0.90),
    "fast": (22.0, 0.75),
}


@dataclasses.dataclass(frozen=True)
class Floor:
    name: str
    psnr_db: float
    ssim: float

    def violations(self, psnr_db: float, ssim: float) -> list[float]:
        """Optuna constraint values: feasible when every entry is <= 0."""
        return [self.psnr_db - psnr_db, self.ssim - ssim]


def parse_floor(text: str) -> Floor:
    """A preset name, or `psnr=DB,ssim=S` (either part may be left out)."""
    if text in FLOOR_PRESETS:
        return Floor(text, *FLOOR_PRESETS[text])
    psnr_db, ssim = 0.0, -1.0
    try:
        for part in text.split(","):
            key, value = part.split("=")
            key = key.strip().lower()
            if key == "psnr":
                psnr_db = float(value)
            elif key == "ssim":
                ssim = float(value)
            else:
                raise ValueError(key)
    except ValueError:
        raise UsageError(f"--floor {text!r}: use one of {', '.join(FLOOR_PRESETS)} or psnr=DB,ssim=S") from None
    if not -1 <= ssim <= 1:
        raise UsageError(f"--floor {text!r}: ssim must be in [-1, 1]")
    return Floor(text, psnr_db, ssim)


def compare(images, references) -> dict[str, float]:
    """Mean and worst PSNR (dB) and SSIM of `images` against `references` (lists of HxWx3 arrays in [0, 1])."""
    import numpy as np
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if len(images) != len(references):
        raise ValueError(f"{len(images)} images against {len(references)} references")
    psnrs, ssims = [], []
    for image, reference in zip(images, references):
        a = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
        b = torch.from_numpy(np.asarray(reference, dtype=np.float32)).permute(2, 0, 1)[None]
        psnr = float(peak_signal_noise_ratio(a, b, data_range=1.0))
        psnrs.append(psnr if math.isfinite(psnr) else math.inf)
        ssims.append(float(structural_similarity_index_measure(a, b, data_range=1.0)))
    return {
        "psnr_db": sum(psnrs) / len(psnrs),
        "psnr_db_min": min(psnrs),
        "ssim": sum(ssims) / len(ssims),
        "ssim_min": min(ssims),
    }
