"""GPU tests of the memory levers on the 20B synthetic model: group offloading (with CUDA streams) and model CPU
offload render the resident pipeline's image with less GPU memory at their peak. Random weights: the image
comparison speaks for numerical fidelity only. (synthetic has no text encoder, so its placement is not tested
here.)"""

import gc

import pytest
import torch

from qwendoctor import quality, runner
from qwendoctor.capabilities import detect_capabilities
from qwendoctor.profile import Profile, Workload

SMALL = Workload(model="synthetic", width=512, height=512, reference_steps=2, dtype="bfloat16")
CAPABILITIES = detect_capabilities(("native", "_native_cudnn"))
PROMPT = "a red fox"
GIB = 1024 ** 3


def _free():
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def _render_with_peak(model):
    """The image and the most GPU memory allocated while rendering it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    image = runner.render(model, SMALL, Profile(), PROMPT, 0)
    torch.cuda.synchronize()
    return image, torch.cuda.max_memory_allocated()


@pytest.fixture(scope="module")
def resident():
    """The default pipeline's image and peak, measured once; the pipeline is freed before the offload tests."""
    _free()
    model = runner.build(SMALL, Profile(), CAPABILITIES)
    runner.render(model, SMALL, Profile(), PROMPT, 0)  # lazy initialisation out of the measured render
    image, peak = _render_with_peak(model)
    print(f"resident: peak {peak / GIB:.1f} GiB")
    del model
    _free()
    return image, peak


def test_group_offload_with_streams_keeps_the_image_with_a_fraction_of_the_memory(resident):
    from diffusers.hooks.group_offloading import _get_top_level_group_offload_hook

    reference, resident_peak = resident
    model = runner.build(SMALL, Profile(offload="group", offload_blocks_per_group=1), CAPABILITIES)
    assert _get_top_level_group_offload_hook(model.pipe.transformer).config.stream is not None
    # The blocks went to the CPU: what stays on the GPU is the embedders, the output layers and the VAE.
    assert torch.cuda.memory_allocated() < 0.25 * resident_peak
    image, peak = _render_with_peak(model)
    fidelity = quality.compare([image], [reference])
    print(f"group offload: peak {peak / GIB:.1f} GiB (resident {resident_peak / GIB:.1f}), "
          f"PSNR {fidelity['psnr_db']:.1f} dB")
    assert fidelity["psnr_db"] > 40  # the same kernels on the same weights: rounding at most
    assert peak < 0.5 * resident_peak
    del model
    _free()


def test_group_offload_with_regional_compile_renders_the_same_image(resident):
    # Under group offloading the blocks compile with graph breaks (fullgraph=False, levers.apply_compile).
    reference, _ = resident
    model = runner.build(SMALL, Profile(offload="group", compile="regional"), CAPABILITIES)
    image = runner.render(model, SMALL, Profile(), PROMPT, 0)
    assert quality.compare([image], [reference])["psnr_db"] > 30  # compiled kernels round differently
    del model
    _free()


def test_model_offload_keeps_the_image_and_lowers_the_peak(resident):
    reference, resident_peak = resident
    model = runner.build(SMALL, Profile(offload="model"), CAPABILITIES)
    assert {name for name, c in model.pipe.components.items() if hasattr(c, "_hf_hook")} == {"transformer", "vae"}
    # Between calls everything is on the CPU.
    assert torch.cuda.memory_allocated() < GIB
    image, peak = _render_with_peak(model)
    fidelity = quality.compare([image], [reference])
    print(f"model offload: peak {peak / GIB:.1f} GiB (resident {resident_peak / GIB:.1f}), "
          f"PSNR {fidelity['psnr_db']:.1f} dB")
    assert fidelity["psnr_db"] > 40
    # The transformer still comes whole to the GPU; the VAE is off it while the transformer runs, and the
    # transformer is off it while the VAE decodes.
    assert peak < resident_peak
    del model
    _free()
