"""GPU tests of memory placement on the full-size synthetic pipeline (20.4B transformer, the 8.3B Qwen2.5-VL text
encoder, the VAE; random bf16 weights): under `--memory-limit 24` the placements the memory plan chooses for a
24 GiB card load and render within it, and draw the resident pipeline's image up to their rounding. Random
weights: the image comparison speaks for numerical fidelity only."""

import gc

import pytest
import torch

from qwendoctor import levers, models, quality, runner
from qwendoctor.levers import memory
from qwendoctor.capabilities import detect_capabilities
from qwendoctor.profile import Profile, Workload

SMALL = Workload(model="synthetic", width=512, height=512, reference_steps=2, dtype="bfloat16")
CAPABILITIES = detect_capabilities(("native", "_native_cudnn"))
PROMPT = "a red fox in the snow"
GIB = 1024 ** 3


def _free():
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0, 0)


def _render_with_peak(model, profile=Profile()):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    image = runner.render(model, SMALL, profile, PROMPT, 0)
    torch.cuda.synchronize()
    return image, torch.cuda.max_memory_allocated() / GIB


@pytest.fixture(scope="module")
def resident():
    """The default pipeline's image and peak: prompts go through the text encoder on the GPU."""
    _free()
    model = runner.build(SMALL, Profile(), CAPABILITIES)
    assert model.has_text_encoder and model.pipe.text_encoder.device.type == "cuda"
    assert sum(p.numel() for p in model.pipe.text_encoder.parameters()) == pytest.approx(8.29e9, rel=0.01)
    image, peak = _render_with_peak(model)
    print(f"resident: peak {peak:.1f} GiB")
    assert peak > 53  # the 38 GiB transformer and the 15.4 GiB text encoder are both on the card
    del model
    _free()
    return image, peak


@pytest.mark.parametrize("profile,psnr_floor", [
    # FP8 weight storage rounds the weights: lossy, so a floor below exact rounding.
    (Profile(weight_storage="fp8_storage", text_encoder="cpu", vae_decode="tiled"), 20),
    # Group offloading computes the same kernels on the same weights.
    (Profile(offload="group", text_encoder="cpu", vae_decode="tiled"), 35),
], ids=["fp8_storage+te_cpu", "group+te_cpu"])
def test_a_24_gib_placement_loads_and_renders_within_the_limit(resident, profile, psnr_floor):
    reference, resident_peak = resident
    memory.apply(24)
    try:
        torch.cuda.reset_peak_memory_stats()
        model = runner.build(SMALL, profile, CAPABILITIES)
        load_peak = torch.cuda.max_memory_allocated() / GIB
        assert model.pipe.text_encoder.device.type == "cpu"
        image, peak = _render_with_peak(model, profile)
    finally:
        model = None
        _free()
    fidelity = quality.compare([image], [reference])
    print(f"{profile.describe()}: load peak {load_peak:.1f} GiB, render peak {peak:.1f} GiB "
          f"(resident {resident_peak:.1f}), PSNR {fidelity['psnr_db']:.1f} dB")
    assert load_peak < 24 and peak < 24
    assert fidelity["psnr_db"] > psnr_floor


def test_the_limit_is_real_the_resident_pipeline_does_not_load_under_24_gib():
    _free()
    memory.apply(24)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            models.load_model("synthetic", "cuda", "bfloat16", on_cpu=levers.load_on_cpu(Profile()))
    finally:
        _free()
