"""FP8 row-wise on Qwen-Image's full-width blocks, at a prompt length a text encoder really gives.

Every FP8 profile of the 20B transformer failed on an H100 (issue 28) with CUBLAS_STATUS_NOT_SUPPORTED in the text
stream's MLP, while the same lever passed on `tiny`: tiny's layers are 64 wide, and the earlier full-size runs fed
128 random text tokens. This runs two blocks of the real width (3072, MLP 12288, text 3584) with 13 text tokens, so
the shape that broke is in the net on every card the GPU tests run on."""

import json
from importlib import resources
from types import SimpleNamespace

import pytest
import torch

from qwendoctor import levers, models
from qwendoctor.profile import Profile

if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("FP8 needs compute capability 8.9 or newer", allow_module_level=True)

TEXT_TOKENS = 13  # not a multiple of 16, as "a red fox in the snow" through the template is not
SIDE = 32  # latent patches a side: a 512x512 image, 1024 image tokens


def _two_full_width_blocks():
    config = json.loads(resources.files("qwendoctor").joinpath("synthetic.json").read_text())["transformer"]
    return models.build_synthetic_transformer({**config, "num_layers": 2}, "cuda", torch.bfloat16, seed=0)


def _inputs():
    generator = torch.Generator(device="cuda").manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, SIDE * SIDE, 64, device="cuda", dtype=torch.bfloat16, generator=generator),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 3584, device="cuda", dtype=torch.bfloat16,
                                          generator=generator),
        timestep=torch.tensor([0.5], device="cuda", dtype=torch.bfloat16),
        img_shapes=[(1, SIDE, SIDE)], return_dict=False)


def _relative_error(transformer, reference, compile_mode: str) -> float:
    """The quantized blocks' output (compiled as `compile_mode` says) against the bf16 `reference`; finite."""
    if compile_mode == "regional":
        transformer.compile_repeated_blocks(fullgraph=True)
    with torch.no_grad():
        out = transformer(**_inputs())[0].float()
    assert torch.isfinite(out).all()
    return float((out - reference).norm() / reference.norm())


@pytest.mark.parametrize("compile_mode", ["none", "regional"])
def test_fp8_rowwise_runs_the_full_width_blocks_at_any_prompt_length(compile_mode):
    transformer = _two_full_width_blocks()
    with torch.no_grad():
        reference = transformer(**_inputs())[0].float()
    pipe = SimpleNamespace(transformer=transformer)
    profile = Profile(quantization="fp8_rowwise", compile=compile_mode)
    levers.apply_quantization(pipe, profile)
    relative = _relative_error(transformer, reference, compile_mode)
    print(f"FP8 row-wise ({compile_mode}) vs bf16 on two full-width blocks: relative error {relative:.4f}")
    assert relative < 0.1  # FP8 rounding of two random blocks, not a wrong product
