"""Each lever's apply function on the tiny model: it does what it says, and is reset where it must be."""

import numpy as np
import pytest
import torch

from qwendoctor import models, optimize, runner
from qwendoctor.errors import UnavailableLever
from qwendoctor.profile import Capabilities, Profile


@pytest.fixture
def fresh_tiny():
    return models.load_model("tiny", "cpu", "float32")


def _attention_backends(pipe):
    return {getattr(m.processor, "_attention_backend", None)
            for m in pipe.transformer.modules() if hasattr(m, "processor")}


def test_apply_tf32_sets_and_resets_matmul_precision(fresh_tiny):
    try:
        optimize.apply_tf32(fresh_tiny.pipe, Profile(tf32=True))
        assert torch.get_float32_matmul_precision() == "high"
        optimize.apply_tf32(fresh_tiny.pipe, Profile(tf32=False))
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_apply_attention_backend_routes_every_attention_module(fresh_tiny, tiny_workload):
    reference = runner.render(fresh_tiny, tiny_workload, Profile(), "a fox", 0)
    optimize.apply_attention_backend(fresh_tiny.pipe, Profile(attention_backend="_native_math"))
    assert {str(getattr(b, "value", b)) for b in _attention_backends(fresh_tiny.pipe)} == {"_native_math"}
    math_image = runner.render(fresh_tiny, tiny_workload, Profile(), "a fox", 0)
    # Same function, another kernel: float32 agreement to rounding.
    assert np.abs(math_image - reference).max() < 1e-4
    optimize.apply_attention_backend(fresh_tiny.pipe, Profile())
    assert {str(getattr(b, "value", b)) for b in _attention_backends(fresh_tiny.pipe)} == {"native"}


def test_apply_quantization_none_leaves_weights_alone(fresh_tiny):
    before = {n: type(p) for n, p in fresh_tiny.pipe.transformer.named_parameters()}
    optimize.apply_quantization(fresh_tiny.pipe, Profile())
    assert {n: type(p) for n, p in fresh_tiny.pipe.transformer.named_parameters()} == before


def test_fp8_is_refused_on_this_cpu_before_the_model_loads(tiny_workload, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the profile was checked")

    monkeypatch.setattr(models, "load_model", must_not_load)
    with pytest.raises(UnavailableLever, match="needs a CUDA GPU"):
        runner.build(tiny_workload, Profile(quantization="fp8_rowwise"), Capabilities(device="cpu"))


def test_apply_cache_enables_first_block_cache_and_resets_it(fresh_tiny, tiny_workload):
    profile = Profile(cache="first_block", cache_threshold=0.2)
    optimize.apply_cache(fresh_tiny.pipe, profile)
    assert fresh_tiny.pipe.transformer.is_cache_enabled
    image = runner.render(fresh_tiny, tiny_workload, profile, "a fox", 0)
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()
    optimize.apply_cache(fresh_tiny.pipe, Profile())
    assert not fresh_tiny.pipe.transformer.is_cache_enabled


@pytest.fixture
def recorded_compiles(monkeypatch):
    """torch.compile replaced by a recorder: the wiring is tested here, real compilation in tests/gpu
    (inductor on the CPU takes ~50 s for the tiny model and its complex-valued rotary code is not its target)."""
    calls = []

    def fake_compile(function=None, **options):
        calls.append(options)
        return function

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def test_apply_compile_regional_compiles_each_block(fresh_tiny, tiny_workload, recorded_compiles):
    reference = runner.render(fresh_tiny, tiny_workload, Profile(steps=2), "a fox", 0)
    optimize.apply_compile(fresh_tiny.pipe, Profile(compile="regional", compile_mode="max-autotune-no-cudagraphs"))
    blocks = fresh_tiny.pipe.transformer.transformer_blocks
    assert len(recorded_compiles) == len(blocks)
    assert all(options == {"fullgraph": True, "mode": "max-autotune-no-cudagraphs"} for options in recorded_compiles)
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert fresh_tiny.pipe.transformer._compiled_call_impl is None  # regional: the blocks, not the model
    assert np.array_equal(runner.render(fresh_tiny, tiny_workload, Profile(steps=2), "a fox", 0), reference)


def test_apply_compile_full_compiles_the_transformer(fresh_tiny, recorded_compiles):
    optimize.apply_compile(fresh_tiny.pipe, Profile(compile="full"))
    assert recorded_compiles == [{"fullgraph": True}]
    assert fresh_tiny.pipe.transformer._compiled_call_impl is not None


def test_apply_compile_none_compiles_nothing(fresh_tiny, recorded_compiles):
    optimize.apply_compile(fresh_tiny.pipe, Profile())
    assert recorded_compiles == []


def test_steps_are_a_call_argument(tiny_workload):
    assert runner.call_arguments(tiny_workload, Profile())["num_inference_steps"] == 4
    assert runner.call_arguments(tiny_workload, Profile(steps=3))["num_inference_steps"] == 3


def test_optimize_applies_levers_in_the_documented_order():
    names = [lever.__name__ for lever in optimize.LEVERS]
    assert names == ["apply_tf32", "apply_attention_backend", "apply_quantization", "apply_cache", "apply_compile"]


def test_tiny_model_is_seeded_and_deterministic(tiny_workload):
    a = runner.render(models.load_model("tiny", "cpu", "float32"), tiny_workload, Profile(), "a fox", 3)
    b = runner.render(models.load_model("tiny", "cpu", "float32"), tiny_workload, Profile(), "a fox", 3)
    assert np.array_equal(a, b)
    assert a.std() > 0.01  # an image, not a constant


def test_unknown_model_is_a_one_line_usage_error():
    from qwendoctor.errors import UsageError

    with pytest.raises(UsageError, match="unknown model 'tinyy'"):
        models.load_model("tinyy", "cpu", "float32")
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        models.load_model("synthetic", "cpu", "bfloat16")


def test_missing_hub_model_says_how_to_get_it(monkeypatch, tmp_path):
    from qwendoctor.errors import UsageError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UsageError, match="huggingface-cli download Qwen/Qwen-Image"):
        models.load_model("Qwen/Qwen-Image", "cpu", "float32")


def test_synthetic_transformer_builds_without_a_full_precision_copy():
    """The synthetic builder on a toy config: weights land in the target dtype with the documented init."""
    import json
    from importlib import resources

    config = json.loads(resources.files("qwendoctor.tiny").joinpath("config.json").read_text())["transformer"]
    transformer = models.build_synthetic_transformer(config, "cpu", torch.bfloat16, seed=0)
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16}
    weight = transformer.transformer_blocks[0].attn.to_q.weight
    assert abs(weight.float().std().item() - weight.shape[1] ** -0.5) < 0.3 * weight.shape[1] ** -0.5
    assert transformer.pos_embed.pos_freqs.device.type == "cpu" and transformer.pos_embed.pos_freqs.is_complex()
