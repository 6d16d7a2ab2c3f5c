"""qwendoctor.quality: floors in PSNR, SSIM and LPIPS, and LPIPS only where it needs no download."""

import numpy as np
import pytest

from qwendoctor import quality
from qwendoctor.errors import UsageError


@pytest.fixture
def lpips_here(monkeypatch, tmp_path):
    """torchvision and the AlexNet weights present (faked), and an LPIPS that is the mean absolute difference."""
    monkeypatch.setattr(quality, "lpips_unavailable", lambda: None)
    monkeypatch.setattr(quality, "lpips", lambda a, b: float((a - b).abs().mean()))


def test_a_floor_may_be_stated_in_any_metric(lpips_here):
    floor = quality.parse_floor("lpips=0.2")
    assert (floor.psnr_db, floor.ssim, floor.lpips) == (0.0, -1.0, 0.2)
    assert floor.violations({"psnr_db": 31.0, "ssim": 0.5, "lpips": 0.25}) == pytest.approx(
        {"psnr": -31.0, "ssim": -1.5, "lpips": 0.05})
    assert quality.parse_floor("psnr=30,ssim=0.9,lpips=0.1").describe() == "PSNR >= 30 dB, SSIM >= 0.9, LPIPS <= 0.1"
    assert "lpips" not in quality.parse_floor("balanced").violations({"psnr_db": 40.0, "ssim": 1.0})


@pytest.mark.parametrize("text, message", [
    ("lpips=2", "lpips must be in [0, 1]"),
    ("lpips=fast", "use one of lossless, balanced, fast"),
    ("ssim=3", "ssim must be in [-1, 1]"),
])
def test_bad_floors_are_one_line_usage_errors(text, message, lpips_here):
    with pytest.raises(UsageError) as error:
        quality.parse_floor(text)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_an_lpips_floor_is_refused_where_lpips_would_need_a_download(monkeypatch):
    monkeypatch.setattr(quality, "lpips_unavailable", lambda: "LPIPS not measured: it needs torchvision")
    with pytest.raises(UsageError, match="--floor 'lpips=0.1': LPIPS not measured: it needs torchvision"):
        quality.parse_floor("lpips=0.1")


def test_lpips_is_unavailable_without_torchvision_or_without_the_weights(monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "torchvision" else
                        real_find_spec(name))
    assert "needs torchvision" in quality.lpips_unavailable()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "torchvision" else
                        real_find_spec(name))
    weights = tmp_path / "alexnet-owt-7be5be79.pth"
    monkeypatch.setattr(quality, "lpips_backbone_path", lambda: str(weights))
    note = quality.lpips_unavailable()
    assert str(weights) in note and "never downloads" in note
    weights.write_bytes(b"weights")
    assert quality.lpips_unavailable() is None


def test_compare_adds_lpips_where_it_is_measured(lpips_here):
    a, b = np.zeros((8, 8, 3)), np.full((8, 8, 3), 0.5)
    measured = quality.compare([a, a], [a, b])
    assert measured["lpips"] == pytest.approx(0.25) and measured["lpips_max"] == pytest.approx(0.5)
    assert "lpips" not in quality.compare([a], [b], with_lpips=False)



# ---- every image judged (issue 30) ----------------------------------------------------------------------------

def _noisy(image, sigma, seed=0):
    return np.clip(image + np.random.default_rng(seed).normal(0, sigma, image.shape), 0, 1)


def test_an_untouched_image_cannot_carry_a_bad_one_past_the_psnr_floor():
    """[untouched image, 2-step image]: the identical one was infinite PSNR, which made the mean infinite and the
    floor pass whatever the other looked like."""
    rng = np.random.default_rng(1)
    references = [rng.uniform(0, 1, (32, 32, 3)) for _ in range(2)]
    bad = _noisy(references[1], 0.2)  # about 15 dB: what a 2-step render looks like against 50
    measured = quality.compare([references[0], bad], references, with_lpips=False)
    assert measured["psnr_db"] < quality.PSNR_CEILING_DB and measured["psnr_db_min"] < 20
    floor = quality.parse_floor("psnr=30,ssim=-1")
    assert floor.violations(measured)["psnr"] > 0


def test_an_identical_image_counts_at_a_finite_ceiling():
    image = np.random.default_rng(2).uniform(0, 1, (16, 16, 3))
    measured = quality.compare([image], [image], with_lpips=False)
    assert measured["psnr_db"] == measured["psnr_db_min"] == quality.PSNR_CEILING_DB
    assert quality.parse_floor("lossless").violations(measured)["psnr"] < 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_an_image_with_non_finite_pixels_has_no_fidelity_and_never_holds(bad):
    image = np.random.default_rng(3).uniform(0, 1, (16, 16, 3))
    broken = image.copy()
    broken[3, 4, 1] = bad
    with pytest.raises(quality.NonFiniteImage, match="image 2 of 2 has NaN or infinite pixels"):
        quality.compare([image, broken], [image, image], with_lpips=False)
    # A non-finite figure reaching the floor is a violation (Optuna refuses a NaN constraint), never a pass.
    found = quality.parse_floor("balanced").violations({"psnr_db": np.nan, "ssim": np.nan})
    assert found == {"psnr": np.inf, "ssim": np.inf}
