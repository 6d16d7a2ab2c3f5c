"""Each lever's apply function on the tiny model: it does what it says, and is reset where it must be."""

import dataclasses
import re

import numpy as np
import pytest
import torch

from qwendoctor import levers, models, runner
from qwendoctor.errors import UnavailableLever
from qwendoctor.profile import Capabilities, Profile, check_runnable


@pytest.fixture
def fresh_tiny():
    return models.load_model("tiny", "cpu", "float32")


def _attention_backends(pipe):
    return {getattr(m.processor, "_attention_backend", None)
            for m in pipe.transformer.modules() if hasattr(m, "processor")}


def test_apply_tf32_sets_and_resets_matmul_precision(fresh_tiny):
    try:
        levers.apply_tf32(fresh_tiny.pipe, Profile(tf32=True))
        assert torch.get_float32_matmul_precision() == "high"
        levers.apply_tf32(fresh_tiny.pipe, Profile(tf32=False))
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_apply_attention_backend_routes_every_attention_module(fresh_tiny, tiny_workload):
    reference = runner.render(fresh_tiny, tiny_workload, Profile(), "a fox", 0)
    levers.apply_attention_backend(fresh_tiny.pipe, Profile(attention_backend="_native_math"))
    assert {str(getattr(b, "value", b)) for b in _attention_backends(fresh_tiny.pipe)} == {"_native_math"}
    math_image = runner.render(fresh_tiny, tiny_workload, Profile(), "a fox", 0)
    # Same function, another kernel: float32 agreement to rounding.
    assert np.abs(math_image - reference).max() < 1e-4
    levers.apply_attention_backend(fresh_tiny.pipe, Profile())
    assert {str(getattr(b, "value", b)) for b in _attention_backends(fresh_tiny.pipe)} == {"native"}


def test_apply_quantization_none_leaves_weights_alone(fresh_tiny):
    before = {n: type(p) for n, p in fresh_tiny.pipe.transformer.named_parameters()}
    levers.apply_quantization(fresh_tiny.pipe, Profile())
    assert {n: type(p) for n, p in fresh_tiny.pipe.transformer.named_parameters()} == before


@pytest.mark.parametrize("quantization", ["fp8_rowwise", "fp8_tensorwise", "fp8_weight_only"])
def test_fp8_leaves_inductor_settings_alone(fresh_tiny, monkeypatch, quantization):
    """torchao's configs switch on coordinate-descent tuning for the whole process by default, which made
    every later compile minutes longer on an H100: ours must ask it not to. (FP8 itself needs a GPU: the
    quantize call is recorded here, and runs in tests/gpu.)"""
    torchao_quantization = pytest.importorskip("torchao.quantization")
    configs = []
    monkeypatch.setattr(torchao_quantization, "quantize_", lambda module, config, **kw: configs.append(config))
    levers.apply_quantization(fresh_tiny.pipe, Profile(quantization=quantization))
    assert configs and all(config.set_inductor_config is False for config in configs)


@pytest.mark.parametrize("quantization", ["fp8_rowwise", "fp8_tensorwise"])
def test_fp8_text_stream_keeps_fp8_weights_and_multiplies_in_bf16(fresh_tiny, monkeypatch, quantization):
    """The text stream's rows are the prompt's tokens: cuBLASLt refused the row-wise product there on an H100
    (issue 28), so its Linears get torchao's weight-only config and the image stream the dynamic one."""
    torchao_quantization = pytest.importorskip("torchao.quantization")
    calls = []
    monkeypatch.setattr(torchao_quantization, "quantize_",
                        lambda module, config, filter_fn=None, **kw: calls.append((type(config).__name__, filter_fn)))
    levers.apply_quantization(fresh_tiny.pipe, Profile(quantization=quantization))
    linear = torch.nn.Linear(32, 32)
    chosen = {kind: [name for name in ("attn.to_q", "attn.add_q_proj", "attn.to_add_out", "img_mlp.net.2",
                                       "txt_mlp.net.2", "txt_mlp.net.0.proj", "attn.to_added_qkv", "img_mod.1")
                     if chosen_filter(linear, f"3.{name}")] for kind, chosen_filter in calls}
    assert chosen == {"Float8DynamicActivationFloat8WeightConfig": ["attn.to_q", "img_mlp.net.2", "img_mod.1"],
                      "Float8WeightOnlyConfig": ["attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.2",
                                                 "txt_mlp.net.0.proj", "attn.to_added_qkv"]}


@pytest.mark.parametrize("quantization, config", [("fp8_rowwise", "Float8DynamicActivationFloat8WeightConfig"),
                                                  ("fp8_weight_only", "Float8WeightOnlyConfig")])
def test_fp8_can_leave_the_text_stream_in_bf16(fresh_tiny, monkeypatch, quantization, config):
    """The faster choice where the memory allows (1.15x a step on an H100 at 1024x1024): no text-stream Linear is
    given to torchao at all, and the image stream is quantized as before."""
    torchao_quantization = pytest.importorskip("torchao.quantization")
    calls = []
    monkeypatch.setattr(torchao_quantization, "quantize_",
                        lambda module, config, filter_fn=None, **kw: calls.append((type(config).__name__, filter_fn)))
    profile = Profile(quantization=quantization, quantization_text_stream="bf16")
    levers.apply_quantization(fresh_tiny.pipe, profile)
    linear = torch.nn.Linear(32, 32)
    assert [kind for kind, _ in calls] == [config]
    names = ("attn.to_q", "attn.add_q_proj", "attn.to_add_out", "img_mlp.net.2", "txt_mlp.net.2", "attn.to_added_qkv")
    assert [name for name in names if calls[0][1](linear, f"3.{name}")] == ["attn.to_q", "img_mlp.net.2"]
    assert profile.describe() == f"attn=native {quantization}(bf16 text stream)"
    assert Profile.from_dict(profile.to_dict()) == profile
    assert "quantization_text_stream" not in Profile(quantization=quantization).to_dict()  # older locks unchanged
    with pytest.raises(levers.UsageError, match=r"^profile\.quantization_text_stream: 'bf16' keeps the text stream "
                                                r"out of FP8, and quantization is 'none'$"):
        Profile(quantization_text_stream="bf16").validate()
    with pytest.raises(levers.UsageError, match=r"quantization_text_stream"):
        Profile(quantization="fp8_rowwise", quantization_text_stream="int8").validate()


def test_fp8_weight_only_with_the_text_stream_in_bf16_quantizes_the_image_stream_alone(fresh_tiny):
    """torchao for real (its weight-only FP8 converts on the CPU; the dynamic configs need an FP8 GPU: the row-wise
    case is tests/gpu/test_fp8_text_stream_gpu.py): the text stream's weights stay plain Parameters."""
    pytest.importorskip("torchao.quantization")
    levers.apply_quantization(fresh_tiny.pipe, Profile(quantization="fp8_weight_only",
                                                       quantization_text_stream="bf16"))
    linears = {name: module for name, module in fresh_tiny.pipe.transformer.transformer_blocks.named_modules()
               if isinstance(module, torch.nn.Linear)}
    kinds = {name: type(module.weight).__name__ for name, module in linears.items()}
    assert {kinds[name] for name in linears if levers.in_text_stream(name)} == {"Parameter"}
    assert {kinds[name] for name in linears if not levers.in_text_stream(name)} == {"Float8Tensor"}


def test_fp8_can_leave_the_blocks_at_either_end_in_bf16(fresh_tiny, monkeypatch):
    """The filter torchao is given quantizes blocks[n:-n] only (names relative to the block list, as torchao
    passes them); on tiny's eight blocks four at each end leave none, which is refused in one line."""
    torchao_quantization = pytest.importorskip("torchao.quantization")
    filters = []
    monkeypatch.setattr(torchao_quantization, "quantize_",
                        lambda module, config, filter_fn=None, **kw: filters.append(filter_fn))
    linear = torch.nn.Linear(32, 32)
    select = levers._block_linear_between(2, 58)
    assert [select(linear, f"{block}.attn.to_q") for block in (0, 1, 2, 57, 58, 59)] == [False, False, True, True,
                                                                                         False, False]
    assert not select(torch.nn.Linear(30, 32), "10.attn.to_q")  # FP8 GEMMs need dimensions divisible by 16
    levers.apply_quantization(fresh_tiny.pipe, Profile(quantization="fp8_rowwise"))
    assert filters[0](linear, "1.img_mlp.net.2")  # the default quantizes every block
    levers.apply_quantization(fresh_tiny.pipe, Profile(quantization="fp8_rowwise", quantization_bf16_blocks=3))
    assert [filters[2](linear, f"{block}.attn.to_q") for block in range(8)] == [False] * 3 + [True] * 2 + [False] * 3
    assert [filters[3](linear, f"{block}.txt_mlp.net.2") for block in range(8)] == [False] * 3 + [True] * 2 + [
        False] * 3
    with pytest.raises(levers.UsageError, match=r"^profile\.quantization_bf16_blocks: 4 at each end of 8 blocks "
                                                r"leaves none to quantize$"):
        levers.apply_quantization(fresh_tiny.pipe, Profile(quantization="fp8_rowwise", quantization_bf16_blocks=4))
    with pytest.raises(levers.UsageError, match=r"^profile\.quantization_bf16_blocks: 2 keeps blocks out of FP8, and "
                                                r"quantization is 'none'$"):
        Profile(quantization_bf16_blocks=2).validate()
    assert Profile(quantization="fp8_rowwise", quantization_bf16_blocks=2).describe() == \
        "attn=native fp8_rowwise(bf16 ends 2)"
    assert "quantization_bf16_blocks" not in Profile(quantization="fp8_rowwise").to_dict()  # older locks unchanged


def test_fp8_is_refused_on_this_cpu_before_the_model_loads(tiny_workload, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the profile was checked")

    monkeypatch.setattr(models, "load_model", must_not_load)
    with pytest.raises(UnavailableLever, match="needs a CUDA GPU"):
        runner.build(tiny_workload, Profile(quantization="fp8_rowwise"), Capabilities(device="cpu"))


def test_apply_cache_enables_first_block_cache_and_resets_it(fresh_tiny, tiny_workload):
    profile = Profile(cache="first_block", cache_threshold=0.2)
    levers.apply_cache(fresh_tiny.pipe, profile)
    assert fresh_tiny.pipe.transformer.is_cache_enabled
    image = runner.render(fresh_tiny, tiny_workload, profile, "a fox", 0)
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()
    levers.apply_cache(fresh_tiny.pipe, Profile())
    assert not fresh_tiny.pipe.transformer.is_cache_enabled


@pytest.mark.parametrize("threshold, batched", [(1e-9, False), (1.0, False), (1.0, True)])
def test_first_block_cache_records_the_steps_it_skipped(fresh_tiny, tiny_workload, threshold, batched):
    """At a threshold nothing meets it skips no call (and so is known inert); at a generous one it skips steps,
    counted once per step whether CFG's two passes are separate calls or one batch (on tiny at 4 steps: one step
    of each image, its two passes together), and an image with a skipped step is not the uncached image."""
    profile = Profile(cache="first_block", cache_threshold=threshold, cfg_batching=batched)
    levers.optimize(fresh_tiny.pipe, profile, workload=tiny_workload)
    measurement = runner.measure(fresh_tiny, tiny_workload, profile, ["a fox"], [0, 1])
    assert measurement.cached_steps == ([0, 0] if threshold < 1e-6 else [1, 1])
    levers.optimize(fresh_tiny.pipe, Profile(cfg_batching=batched), workload=tiny_workload)
    uncached = runner.measure(fresh_tiny, tiny_workload, Profile(cfg_batching=batched), ["a fox"], [0, 1])
    differs = [np.abs(a - b).max() > 1e-4 for a, b in zip(measurement.images, uncached.images)]
    assert differs == [threshold > 1e-6] * 2
    levers.optimize(fresh_tiny.pipe, Profile(), workload=tiny_workload)
    assert levers.cached_steps(fresh_tiny.pipe) is None


def test_apply_compile_regional_compiles_each_block(fresh_tiny, tiny_workload, recorded_compiles):
    reference = runner.render(fresh_tiny, tiny_workload, Profile(steps=2), "a fox", 0)
    levers.apply_compile(fresh_tiny.pipe, Profile(compile="regional", compile_mode="max-autotune-no-cudagraphs"))
    blocks = fresh_tiny.pipe.transformer.transformer_blocks
    assert len(recorded_compiles) == len(blocks)
    assert all(options == {"fullgraph": True, "mode": "max-autotune-no-cudagraphs"} for options in recorded_compiles)
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert fresh_tiny.pipe.transformer._compiled_call_impl is None  # regional: the blocks, not the model
    assert np.array_equal(runner.render(fresh_tiny, tiny_workload, Profile(steps=2), "a fox", 0), reference)


def test_coordinate_descent_is_an_inductor_option_of_this_compile_only(fresh_tiny, recorded_compiles):
    levers.apply_compile(fresh_tiny.pipe, Profile(compile="full", compile_mode="coordinate-descent"))
    assert recorded_compiles == [{"fullgraph": True, "options": {"coordinate_descent_tuning": True,
                                                                  "coordinate_descent_check_all_directions": True}}]
    import torch._inductor.config as inductor_config

    assert not inductor_config.coordinate_descent_tuning  # nothing process-wide


def test_apply_compile_full_compiles_the_transformer(fresh_tiny, recorded_compiles):
    levers.apply_compile(fresh_tiny.pipe, Profile(compile="full"))
    assert recorded_compiles == [{"fullgraph": True}]
    assert fresh_tiny.pipe.transformer._compiled_call_impl is not None


def test_apply_compile_none_compiles_nothing(fresh_tiny, recorded_compiles):
    levers.apply_compile(fresh_tiny.pipe, Profile())
    assert recorded_compiles == []


def test_steps_are_a_call_argument(tiny_workload):
    assert runner.call_arguments(tiny_workload, Profile())["num_inference_steps"] == 4
    assert runner.call_arguments(tiny_workload, Profile(steps=3))["num_inference_steps"] == 3


def test_optimize_applies_levers_in_the_documented_order():
    names = [lever.apply.__name__ for lever in levers.LEVERS if lever.apply is not None]
    assert names == ["apply_tf32", "apply_attention_backend", "apply_real_rope", "apply_lora", "apply_distilled",
                     "apply_fused_qkv",
                     "apply_gelu_epilogue", "apply_quantization", "apply_weight_storage", "apply_cache",
                     "apply_offload", "apply_text_encoder", "apply_context_parallel", "apply_compile",
                     "apply_cfg_batching", "apply_cfg_parallel", "apply_vae_decode"]


def test_apply_real_rope_rotates_like_the_complex_path_and_is_undone(fresh_tiny, tiny_workload):
    from diffusers.models.transformers import transformer_qwenimage

    from qwendoctor.levers import real_rope as rope

    original = transformer_qwenimage.apply_rotary_emb_qwen
    x = torch.randn(2, 7, 3, 8, dtype=torch.bfloat16)
    freqs = torch.polar(torch.ones(7, 4), torch.randn(7, 4))  # unit complex numbers, as RoPE's
    expected = original(x, freqs, use_real=False)
    reference = runner.render(fresh_tiny, tiny_workload, Profile(), "a fox", 0)
    try:
        levers.apply_real_rope(fresh_tiny.pipe, Profile(real_rope=True))
        assert rope.enabled()
        assert torch.allclose(transformer_qwenimage.apply_rotary_emb_qwen(x, freqs, use_real=False).float(),
                              expected.float(), atol=1e-2)
        assert transformer_qwenimage.apply_rotary_emb_qwen(x, freqs, use_real=False).dtype == torch.bfloat16
        image = runner.render(fresh_tiny, tiny_workload, Profile(), "a fox", 0)
        assert np.abs(image - reference).max() < 1e-4  # the same rotation, in float32 either way
    finally:
        levers.apply_real_rope(fresh_tiny.pipe, Profile())
    assert transformer_qwenimage.apply_rotary_emb_qwen is original and not rope.enabled()


@pytest.fixture
def transformer_batches(monkeypatch):
    """The batch size of every real transformer pass."""
    from diffusers import QwenImageTransformer2DModel

    seen = []
    real_forward = QwenImageTransformer2DModel.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs["hidden_states"].shape[0])
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(QwenImageTransformer2DModel, "forward", spy)
    return seen


def test_apply_cfg_batching_runs_one_batch_2_pass_a_step_with_the_same_image(fresh_tiny, tiny_workload,
                                                                              transformer_batches):
    reference = runner.render(fresh_tiny, tiny_workload, Profile(), "a red fox in the snow", 0)
    assert transformer_batches == [1] * 2 * tiny_workload.reference_steps
    transformer_batches.clear()
    levers.apply_cfg_batching(fresh_tiny.pipe, Profile(cfg_batching=True))
    batched = runner.render(fresh_tiny, tiny_workload, Profile(), "a red fox in the snow", 0)
    assert transformer_batches == [2] * tiny_workload.reference_steps
    # The tiny model encodes prompt and negative prompt to different lengths: the padded, masked batch must
    # give the image the two separate passes gave, to float32 rounding.
    assert np.abs(batched - reference).max() < 1e-4
    transformer_batches.clear()
    levers.apply_cfg_batching(fresh_tiny.pipe, Profile())
    from diffusers import QwenImageTransformer2DModel

    assert type(fresh_tiny.pipe.transformer) is QwenImageTransformer2DModel  # its own class back
    assert "encode_prompt" not in vars(fresh_tiny.pipe)
    assert np.array_equal(runner.render(fresh_tiny, tiny_workload, Profile(), "a red fox in the snow", 0), reference)
    assert transformer_batches == [1] * 2 * tiny_workload.reference_steps


def test_cfg_batching_leaves_a_call_without_cfg_as_it_was(fresh_tiny, tiny_workload, transformer_batches):
    import dataclasses

    no_cfg = dataclasses.replace(tiny_workload, true_cfg_scale=1.0)
    reference = runner.render(fresh_tiny, no_cfg, Profile(), "a fox", 0)
    levers.apply_cfg_batching(fresh_tiny.pipe, Profile(cfg_batching=True))
    transformer_batches.clear()
    # The same pipeline serves a CFG call and then a call without CFG: the second must not reuse the first's
    # negative prompt.
    runner.render(fresh_tiny, tiny_workload, Profile(), "a fox", 0)
    image = runner.render(fresh_tiny, no_cfg, Profile(), "a fox", 0)
    assert transformer_batches == [2] * tiny_workload.reference_steps + [1] * tiny_workload.reference_steps
    assert np.array_equal(image, reference)


def test_cfg_batching_reaches_the_real_transformer_for_the_other_levers(fresh_tiny, recorded_compiles):
    levers.apply_cfg_batching(fresh_tiny.pipe, Profile(cfg_batching=True))
    levers.apply_compile(fresh_tiny.pipe, Profile(compile="full"))
    levers.apply_attention_backend(fresh_tiny.pipe, Profile(attention_backend="_native_math"))
    real = fresh_tiny.pipe.transformer
    assert real._compiled_call_impl is not None and recorded_compiles == [{"fullgraph": True}]
    assert {str(getattr(b, "value", b)) for b in _attention_backends(fresh_tiny.pipe)} == {"_native_math"}


def test_cfg_batching_without_cfg_is_refused_before_loading(tiny_workload):
    import dataclasses

    from qwendoctor.errors import UsageError
    from qwendoctor.profile import check_runnable

    with pytest.raises(UsageError, match="cfg_batching.*no CFG"):
        check_runnable(Profile(cfg_batching=True), dataclasses.replace(tiny_workload, true_cfg_scale=1.0),
                       Capabilities(device="cpu"))


def test_text_pair_padding_masks_only_what_it_pads():
    from qwendoctor.levers.cfg_batching import _pad_text_pair

    a, b = torch.randn(1, 5, 8), torch.randn(1, 3, 8)
    text, mask = _pad_text_pair(a, None, b, None)
    assert text.shape == (2, 5, 8) and mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert torch.equal(text[1, 3:], torch.zeros(2, 8)) and torch.equal(text[0], a[0])
    same, no_mask = _pad_text_pair(a, None, torch.randn(1, 5, 8), None)
    assert same.shape == (2, 5, 8) and no_mask is None  # equal lengths keep the mask-free kernels


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
    from qwendoctor.tiny.trained import read_config

    config = read_config()["model"]["transformer"]
    transformer = models.build_synthetic_transformer(config, "cpu", torch.bfloat16, seed=0)
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16}
    weight = transformer.transformer_blocks[0].attn.to_q.weight
    assert abs(weight.float().std().item() - weight.shape[1] ** -0.5) < 0.3 * weight.shape[1] ** -0.5
    assert transformer.pos_embed.pos_freqs.device.type == "cpu" and transformer.pos_embed.pos_freqs.is_complex()


# ---- the table itself --------------------------------------------------------------------------------------

def test_every_profile_field_is_declared_by_exactly_one_lever():
    import dataclasses

    names = [field.name for field in levers.FIELDS]
    assert len(names) == len(set(names))
    assert [f.name for f in dataclasses.fields(Profile)] == names
    assert {f.name: f.default for f in dataclasses.fields(Profile)} == {f.name: f.default for f in levers.FIELDS}


def test_the_search_draws_every_field_of_the_levers_it_searches(tiny_workload):
    """The default parameters, drawn through each searched lever's `sample`, give back the default profile."""
    import optuna

    from qwendoctor import space

    h100 = Capabilities(device="cuda", compute_capability=(9, 0), has_torchao=True, compile_works=True,
                        working_attention_backends=("native", "_native_cudnn"))
    search = space.build_search_space(h100, tiny_workload, exhaustive=True, evidence=lambda rule: None)
    assert set(search.offers) == {lever.name for lever in levers.SEARCH_ORDER}
    assert all(lever.offer is not None and lever.sample is not None for lever in levers.SEARCH_ORDER)
    assert space.sample_profile(optuna.trial.FixedTrial(space.default_params(search)), search) == Profile()


def test_what_a_transformer_carries_follows_the_levers_that_cannot_be_undone():
    assert levers.baked_part(Profile(tf32=False, cfg_batching=True, steps=3)) is None
    assert levers.baked_part(Profile(quantization="fp8_weight_only")) == {
        "quantization": "fp8_weight_only", "quantization_bf16_blocks": 0, "quantization_text_stream": "fp8_weight_only"}
    # A compiled graph froze every lever it traced in; steps are an argument of each call.
    compiled = levers.baked_part(Profile(compile="regional", real_rope=True, steps=3))
    assert compiled == Profile(compile="regional", real_rope=True).to_dict()
    assert not any(lever.undoable for lever in levers.LEVERS if lever.captures_profile)


def test_optimize_with_undoable_only_leaves_the_other_levers_alone(monkeypatch):
    calls = []

    def recorder(name):
        def apply(pipe, profile):
            calls.append(name)
            return pipe
        return apply

    monkeypatch.setattr(levers, "LEVERS", (levers.Lever("a", recorder("a"), undoable=True),
                                           levers.Lever("b", recorder("b"), undoable=False),
                                           levers.Lever("steps", None, undoable=True)))
    levers.optimize(object(), Profile(), undoable_only=True)
    levers.optimize(object(), Profile())
    assert calls == ["a", "a", "b"]


def test_profile_text_is_parsed_by_each_fields_kind():
    profile = Profile.from_text("compile=regional, cfg_batching=true, steps=30, cache=first_block,"
                                "cache_threshold=0.1,compile=none")
    assert (profile.compile, profile.cfg_batching, profile.steps, profile.cache_threshold) == ("none", True, 30, 0.1)
    assert Profile.from_dict(profile.to_dict()) == profile


# ---- block caching (cache-dit) -----------------------------------------------------------------------------

DBCACHE = {"cache": "dbcache", "cache_threshold": 1.0, "cache_warmup": 2}  # everything after 2 steps may be reused


def test_dbcache_reuses_blocks_and_is_undone(fresh_tiny, tiny_workload):
    pytest.importorskip("cache_dit")
    workload = dataclasses.replace(tiny_workload, reference_steps=8)
    reference = runner.render(fresh_tiny, workload, Profile(), "a fox", 0)
    levers.apply_cache(fresh_tiny.pipe, Profile(**DBCACHE))
    cached = runner.render(fresh_tiny, workload, Profile(), "a fox", 0)
    assert np.isfinite(cached).all() and not np.array_equal(cached, reference)
    assert 0 < levers.cached_steps(fresh_tiny.pipe) < 8
    levers.apply_cache(fresh_tiny.pipe, Profile())
    assert levers.cached_steps(fresh_tiny.pipe) is None
    np.testing.assert_array_equal(runner.render(fresh_tiny, workload, Profile(), "a fox", 0), reference)


def test_dbcache_stacks_with_regional_compile_and_cfg_batching(fresh_tiny, tiny_workload, recorded_compiles):
    pytest.importorskip("cache_dit")
    from qwendoctor.levers import cfg_batching

    workload = dataclasses.replace(tiny_workload, reference_steps=8)
    profile = Profile(**DBCACHE, compile="regional")
    levers.optimize(fresh_tiny.pipe, profile, workload=workload)
    assert len(recorded_compiles) == len(fresh_tiny.pipe.transformer.transformer_blocks)
    assert np.isfinite(runner.render(fresh_tiny, workload, profile, "a fox", 0)).all()
    assert levers.cached_steps(fresh_tiny.pipe) > 0
    # The pool's next trial adds CFG batching on the same pipeline: one batch-2 call a step, one cache for both
    # passes, the interception around the hooked transformer.
    batched = dataclasses.replace(profile, cfg_batching=True)
    levers.optimize(fresh_tiny.pipe, batched, undoable_only=True, workload=workload)
    assert cfg_batching.interception(fresh_tiny.pipe.transformer) is not None
    assert not levers.separate_cfg_passes(fresh_tiny.pipe, batched)
    image = runner.render(fresh_tiny, workload, batched, "a fox", 0)
    assert np.isfinite(image).all() and fresh_tiny.pipe.transformer.batched_calls == 8
    assert 0 < levers.cached_steps(fresh_tiny.pipe) < 8
    levers.optimize(fresh_tiny.pipe, Profile(compile="regional"), undoable_only=True, workload=workload)
    assert levers.cached_steps(fresh_tiny.pipe) is None
    assert cfg_batching.interception(fresh_tiny.pipe.transformer) is None


def test_dbcache_without_cfg_counts_each_call_as_a_step(fresh_tiny, tiny_workload):
    """true_cfg_scale 1: the transformer runs once a step, so cache-dit must not pair the calls as CFG passes."""
    pytest.importorskip("cache_dit")
    workload = dataclasses.replace(tiny_workload, reference_steps=8, true_cfg_scale=1.0)
    levers.optimize(fresh_tiny.pipe, Profile(**DBCACHE), workload=workload)
    assert not levers.separate_cfg_passes(fresh_tiny.pipe, Profile(**DBCACHE))
    assert np.isfinite(runner.render(fresh_tiny, workload, Profile(**DBCACHE), "a fox", 0)).all()
    assert 0 < levers.cached_steps(fresh_tiny.pipe) < 8


def test_dbcache_needs_cache_dit_and_refuses_what_it_cannot_hook(tiny_workload):
    from qwendoctor.errors import UsageError

    with pytest.raises(UnavailableLever, match=r"needs cache-dit: pip install 'qwendoctor\[cache\]'"):
        check_runnable(Profile(**DBCACHE), tiny_workload, Capabilities(device="cpu"))
    check_runnable(Profile(**DBCACHE), tiny_workload, Capabilities(device="cpu", has_cache_dit=True))
    for bad, message in ((dict(DBCACHE, compile="full"), "compile = regional (measured), not full"),
                         (dict(DBCACHE, taylorseer_order=3), "profile.taylorseer_order: 3 is not one of 1, 2"),
                         (dict(DBCACHE, cache_bn=-1), "profile.cache_bn: must be an integer >= 0"),
                         ({"cache_fn": 2}, "profile.cache_fn: set without cache = dbcache")):
        with pytest.raises(UsageError, match=re.escape(message)):
            Profile(**bad).validate()


def test_the_search_draws_dbcache_under_compile_with_cfg_batching(tiny_workload):
    import optuna

    from qwendoctor import space

    h100 = Capabilities(device="cuda", compute_capability=(9, 0), has_torchao=True, has_cache_dit=True,
                        working_attention_backends=("native",))
    drawing = dataclasses.replace(tiny_workload, model="Qwen/Qwen-Image", reference_steps=50, dtype="bfloat16")
    search = space.build_search_space(h100, drawing, evidence=lambda rule: None)
    assert search.values("cache") == ("none", "first_block", "dbcache")
    trial = optuna.trial.FixedTrial({"attention_backend": "native", "compile": "regional", "compile_mode": "default",
                                     "quantization": "fp8_rowwise", "cache_compiled": "dbcache",
                                     "cache_threshold": 0.1, "cache_fn": 2, "cache_bn": 0, "cache_warmup": 4,
                                     "cache_max_run": 3, "taylorseer_order": 1, "tf32": False, "real_rope": True,
                                     "cfg_batching": True, "steps": 40, "fused_qkv": True,
                                     "quantization_bf16_blocks": 2, "quantization_text_stream": "bf16"})
    profile = space.sample_profile(trial, search)
    assert profile.fused_qkv and profile.quantization_bf16_blocks == 2
    assert profile.quantization_text_stream == "bf16"
    assert search.values("quantization_bf16_blocks") == (0, 1, 2)
    assert search.values("quantization_text_stream") == ("fp8_weight_only", "bf16")
    assert (profile.cache, profile.cache_fn, profile.taylorseer_order, profile.cfg_batching) == ("dbcache", 2, 1, True)
    assert levers.is_lossy(profile)
    no_cache_dit = space.build_search_space(dataclasses.replace(h100, has_cache_dit=False), drawing)
    assert no_cache_dit.values("cache") == ("none", "first_block")
    assert any("cache-dit is not installed" in line for line in no_cache_dit.left_out)


def test_dbcache_leaves_blocks_to_reuse(fresh_tiny, tiny_workload):
    """On a 2-block transformer the search draws only F1B0, and a profile that would always compute every block is
    one line, not a cache-dit error."""
    pytest.importorskip("cache_dit")
    import optuna

    from qwendoctor import space
    from qwendoctor.errors import UsageError

    drawing = Capabilities(device="cpu", has_cache_dit=True, working_attention_backends=("native",))
    search = space.build_search_space(drawing, tiny_workload, evidence=lambda rule: None)
    assert search.context.blocks == len(fresh_tiny.pipe.transformer.transformer_blocks) == 8
    two_blocks = dataclasses.replace(search.context, draws=True, blocks=2)
    offer = levers.CACHE.offer(two_blocks)
    trial = optuna.create_study().ask()
    for _ in range(20):
        drawn = levers.CACHE.sample(trial, levers.Offer({"cache": ("dbcache",)}), {"compile": "none"}, two_blocks)
        assert (drawn["cache_fn"] or 1) + (drawn["cache_bn"] or 0) < 2
        trial = optuna.create_study().ask()
    assert "dbcache" in offer.values["cache"]
    with pytest.raises(UsageError, match="leave none of this transformer's 8 to reuse"):
        levers.apply_cache(fresh_tiny.pipe, Profile(**DBCACHE, cache_fn=6, cache_bn=2))


def test_first_block_cache_stacks_with_cfg_batching(fresh_tiny, tiny_workload):
    """diffusers' hooks see one batch-2 call a step under CFG batching; taking the profile off leaves the plain
    transformer with no hooks."""
    from qwendoctor.levers import cfg_batching

    workload = dataclasses.replace(tiny_workload, reference_steps=8)
    reference = runner.render(fresh_tiny, workload, Profile(), "a fox", 0)
    profile = Profile(cache="first_block", cache_threshold=1.0, cfg_batching=True)
    levers.optimize(fresh_tiny.pipe, profile, workload=workload)
    assert cfg_batching.interception(fresh_tiny.pipe.transformer) is not None
    assert fresh_tiny.pipe.transformer.is_cache_enabled
    middle_ran = []  # a middle block's first layer runs only when the block is computed, not reused
    hook = fresh_tiny.pipe.transformer.transformer_blocks[1].img_mod.register_forward_hook(
        lambda *args: middle_ran.append(1))
    image = runner.render(fresh_tiny, workload, profile, "a fox", 0)
    hook.remove()
    assert fresh_tiny.pipe.transformer.batched_calls == 8
    assert 0 < len(middle_ran) < 8  # one batch-2 call a step, some of them reusing the middle blocks
    assert np.isfinite(image).all() and not np.array_equal(image, reference)
    levers.optimize(fresh_tiny.pipe, Profile(), undoable_only=True, workload=workload)
    assert cfg_batching.interception(fresh_tiny.pipe.transformer) is None
    assert not fresh_tiny.pipe.transformer.is_cache_enabled
    np.testing.assert_array_equal(runner.render(fresh_tiny, workload, Profile(), "a fox", 0), reference)


def test_cuda_graphs_need_cfg_batching_under_true_cfg_and_are_never_sampled(tiny_workload):
    """compile_mode = reduce-overhead (levers.CUDA_GRAPHS): refused where its cause applies, measured by the bench
    before tune searches it."""
    from qwendoctor import space
    from qwendoctor.errors import UsageError

    gpu = Capabilities(device="cuda", compute_capability=(9, 0), compile_works=True,
                       working_attention_backends=("native",))
    graphs = Profile(compile="full", compile_mode="reduce-overhead")
    assert tiny_workload.does_cfg
    with pytest.raises(UsageError, match=r"^profile\.compile_mode: reduce-overhead with true CFG needs "
                                         r"cfg_batching = true: the pipeline keeps the cond pass's output"):
        check_runnable(graphs, tiny_workload, gpu)
    check_runnable(dataclasses.replace(graphs, cfg_batching=True), tiny_workload, gpu)
    check_runnable(graphs, dataclasses.replace(tiny_workload, true_cfg_scale=1.0), gpu)  # one pass per step
    searched = space.build_search_space(gpu, tiny_workload, exhaustive=True, evidence=lambda rule: None)
    assert "reduce-overhead" not in searched.values("compile_mode")
    assert any(line.startswith("reduce-overhead (CUDA graphs): not yet measured") for line in searched.left_out)
