"""LoRAs on CUDA (issue 27), on tiny: fused draws the unfused image in bf16; a hotswap under regional compile (inductor)
compiles no new graph and draws what the new LoRA draws; FP8 row-wise after fusion keeps the frame style LoRA's
effect. What holding a LoRA costs the 20B transformer per step is benchmarks/tools/lora_gpu.py's, never asserted."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qwendoctor import compile_stats, models, runner
from qwendoctor.capabilities import detect_capabilities
from qwendoctor.levers import lora
from qwendoctor.profile import Profile, Workload
from qwendoctor.tiny import shapes
from qwendoctor.tiny.trained import read_config

SPEC = importlib.util.spec_from_file_location("lora_gpu", Path(__file__).parents[2] / "benchmarks/tools/lora_gpu.py")
lora_gpu = importlib.util.module_from_spec(SPEC)
sys.modules["lora_gpu"] = lora_gpu
SPEC.loader.exec_module(lora_gpu)

PROMPT = "a small red circle at the top left on a blue background"


def _psnr(a, b) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _tiny(loras, steps: int) -> Workload:
    return Workload(model="tiny", width=128, height=128, reference_steps=steps, dtype="bfloat16",
                    loras=tuple(loras)).validate()


@pytest.fixture(scope="module")
def capabilities():
    return detect_capabilities()


@pytest.fixture(scope="module")
def random_loras(tmp_path_factory):
    """Two seeded random LoRAs of tiny made by the GPU tool's builder: rank 8, and rank 4 at another scale."""
    root = tmp_path_factory.mktemp("loras")
    targets = lora_gpu.lora_shapes(models.transformer_config("tiny"))
    # Tiny's weights are trained, not random: a tenth of a random Linear's output is enough to change its image.
    first = lora_gpu.write_lora(root / "a", targets, rank=8, seed=0, relative=0.1, device="cuda")
    second = lora_gpu.write_lora(root / "b", targets, rank=4, seed=1, relative=0.1, device="cuda")
    return lora.parse_spec(str(first), "tiny"), lora.parse_spec(f"{second}:0.7", "tiny")


def test_fused_draws_the_unfused_image_in_bf16(capabilities):
    frame = lora.parse_spec("tiny:frame", "tiny")
    workload = _tiny([frame], steps=8)
    images = {}
    for mode in ("unfused", "fused"):
        profile = Profile(lora_mode=mode)
        model = runner.build(workload, profile, capabilities)
        images[mode] = runner.render(model, workload, profile, PROMPT, 0)
        del model
    plain = runner.build(_tiny([], steps=8), Profile(), capabilities)
    without = runner.render(plain, _tiny([], steps=8), Profile(), PROMPT, 0)
    fused_vs_unfused, lora_vs_none = _psnr(images["fused"], images["unfused"]), _psnr(images["unfused"], without)
    print(f"fused vs unfused {fused_vs_unfused:.1f} dB; unfused vs no LoRA {lora_vs_none:.1f} dB")
    # bf16: W + BA rounded once against Wx and B(Ax) rounded apart; the frame itself is a change of ~10 dB.
    assert fused_vs_unfused > 30 and lora_vs_none < fused_vs_unfused - 10


def test_a_hotswap_under_regional_compile_compiles_no_new_graph(capabilities, random_loras):
    first, second = random_loras
    profile = Profile(compile="regional")
    workload = _tiny([first], steps=4)
    started = compile_stats.snapshot()
    model = runner.build(workload, profile, capabilities)
    before = runner.render(model, workload, profile, PROMPT, 0)
    compiled = compile_stats.since(started).get("graphs", 0)
    assert compiled >= 1  # inductor compiled the blocks here: the counter counts this backend's graphs
    graphs = compile_stats.snapshot()
    lora.hotswap(model.pipe, (second,), "tiny")
    swapped = runner.render(model, _tiny([second], steps=4), profile, PROMPT, 0)
    new = compile_stats.since(graphs)
    print(f"regional compile: {compiled} graph(s); after the hotswap: {compile_stats.describe(new)}")
    assert new.get("graphs", 0) == 0, new
    del model
    eager = runner.build(_tiny([second], steps=4), Profile(), capabilities)
    expected = runner.render(eager, _tiny([second], steps=4), Profile(), PROMPT, 0)
    print(f"hotswapped vs the second LoRA eager: {_psnr(swapped, expected):.1f} dB; vs the first LoRA's image "
          f"{_psnr(swapped, before):.1f} dB")
    # The swap took: the compiled graph now draws the second LoRA (compile against eager, in bf16), not the first.
    assert _psnr(swapped, expected) > 30 and _psnr(swapped, before) < _psnr(swapped, expected)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs compute capability 8.9 or newer")
def test_fp8_after_fusion_keeps_the_frame_style(capabilities):
    prompts = shapes.held_out_prompts(read_config()["training"]["seed"])[:10]
    workload = _tiny([lora.parse_spec("tiny:frame", "tiny")], steps=50)
    profile = Profile(lora_mode="fused", quantization="fp8_rowwise")
    model = runner.build(workload, profile, capabilities)
    kinds = lora_gpu.weight_kinds(model.pipe.transformer)
    assert sum(count for kind, count in kinds.items() if kind != "Parameter") > 0, kinds  # FP8 did apply
    images = [lora_gpu.to_uint8(runner.render(model, workload, profile, prompt, seed))
              for seed, prompt in enumerate(prompts)]
    styled = float(np.mean([shapes.style_present(image) for image in images]))
    inside = float(np.mean([shapes.check(image, prompt, "frame")["pass"] for image, prompt in zip(images, prompts)]))
    print(f"FP8 row-wise after fusion: block Linears {kinds}; frame read on {styled:.0%}, checker inside the frame "
          f"{inside:.0%} of {len(prompts)} prompts")
    assert styled >= 0.7
