"""The memory levers (weight storage, offload, text encoder placement, VAE decode) on the tiny model.

This machine has no GPU, so offloading moves nothing here: the transformer's onload device is the CPU it already
lives on. What these tests check on the CPU is that diffusers' and accelerate's hooks are installed where the lever
says, and that the image through them is the resident pipeline's. That memory actually goes down is measured on a
GPU (tests/gpu/test_memory_gpu.py).
"""

import dataclasses
import types

import numpy as np
import pytest
import torch

from qwendoctor import levers, lockfile, models, pool, runner
from qwendoctor.errors import UnavailableLever, UsageError
from qwendoctor.profile import Capabilities, Profile, check_runnable


@pytest.fixture
def fresh_tiny():
    return models.load_model("tiny", "cpu", "float32")


@pytest.fixture
def workload(tiny_workload):
    # 64 px, 2 steps: a quarter of tiny's tokens, so the renders here stay fast on two cores.
    return dataclasses.replace(tiny_workload, width=64, height=64, reference_steps=2).validate()


def _render(model, workload):
    return runner.render(model, workload, Profile(), "a fox", 0)


# ---- VAE decode (undoable) ----------------------------------------------------------------------------------

def test_tiled_vae_decode_decodes_in_tiles_and_is_undone(fresh_tiny, workload, monkeypatch):
    reference = _render(fresh_tiny, workload)
    vae = fresh_tiny.pipe.vae
    levers.apply_vae_decode(fresh_tiny.pipe, Profile(vae_decode="tiled"))
    assert vae.use_tiling and not vae.use_slicing
    # diffusers' tiles are 256 px, larger than this 64 px image: smaller ones here, so that tiling happens.
    monkeypatch.setattr(vae, "tile_sample_min_height", 48)
    monkeypatch.setattr(vae, "tile_sample_min_width", 48)
    monkeypatch.setattr(vae, "tile_sample_stride_height", 32)
    monkeypatch.setattr(vae, "tile_sample_stride_width", 32)
    tiled_calls = []
    tiled_decode = vae.tiled_decode
    monkeypatch.setattr(vae, "tiled_decode", lambda *a, **kw: tiled_calls.append(1) or tiled_decode(*a, **kw))
    tiled = _render(fresh_tiny, workload)
    assert tiled_calls == [1]
    # The seams are blended, so the tiled image is close to the full decode but not equal to it.
    difference = np.abs(tiled - reference)
    assert 0 < difference.max() and difference.mean() < 0.03  # 0.015 measured at these tiles

    levers.apply_vae_decode(fresh_tiny.pipe, Profile())
    assert not vae.use_tiling
    np.testing.assert_array_equal(_render(fresh_tiny, workload), reference)
    assert tiled_calls == [1]


def test_sliced_vae_decode_decodes_a_batch_one_image_at_a_time_and_is_undone(fresh_tiny, monkeypatch):
    vae = fresh_tiny.pipe.vae
    latents = torch.randn(2, vae.config.z_dim, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = vae.decode(latents).sample
    levers.apply_vae_decode(fresh_tiny.pipe, Profile(vae_decode="sliced"))
    assert vae.use_slicing and not vae.use_tiling
    batches = []
    decode = vae._decode
    monkeypatch.setattr(vae, "_decode", lambda z, *a, **kw: batches.append(z.shape[0]) or decode(z, *a, **kw))
    with torch.inference_mode():
        sliced = vae.decode(latents).sample
    assert batches == [1, 1]
    torch.testing.assert_close(sliced, whole, atol=1e-5, rtol=1e-5)
    levers.apply_vae_decode(fresh_tiny.pipe, Profile())
    assert not vae.use_slicing


# ---- weight storage (FP8, diffusers' layerwise casting) --------------------------------------------------------

def test_fp8_storage_keeps_block_weights_in_fp8_and_upcasts_them_per_layer_on_the_cpu(fresh_tiny, workload):
    reference = _render(fresh_tiny, workload)
    levers.apply_weight_storage(fresh_tiny.pipe, Profile(weight_storage="fp8_storage"))
    block = fresh_tiny.pipe.transformer.transformer_blocks[0]
    assert block.img_mlp.net[2].weight.dtype == torch.float8_e4m3fn
    # The model's skip list (norms, rotary embedding) and diffusers' (the output projection) stay in its dtype.
    assert block.attn.norm_q.weight.dtype == fresh_tiny.pipe.transformer.proj_out.weight.dtype == torch.float32
    image = _render(fresh_tiny, workload)
    difference = np.abs(image - reference)
    # FP8 weights round to 3 mantissa bits: a different image, though near the float32 one.
    assert 0 < difference.mean() < 0.05
    assert levers.is_lossy(Profile(weight_storage="fp8_storage"))


def test_int8_weight_storage_quantizes_the_block_linears_and_keeps_its_weights_as_they_are(fresh_tiny, workload):
    reference = _render(fresh_tiny, workload)
    profile = Profile(weight_storage="int8_weight_only")
    levers.apply_weight_storage(fresh_tiny.pipe, profile)
    transformer = fresh_tiny.pipe.transformer
    assert type(transformer.transformer_blocks[0].img_mlp.net[2].weight).__name__ == "Int8Tensor"
    assert type(transformer.proj_out.weight) is torch.nn.Parameter  # outside the blocks: untouched
    image = _render(fresh_tiny, workload)
    assert 0 < np.abs(image - reference).mean() < 0.05  # int8 rounding: near the float32 image, not equal
    assert levers.is_lossy(profile) and profile.describe() == "attn=native int8-storage"
    assert levers.fingerprint_fields(profile) == ("torchao",)
    with pytest.raises(UsageError, match=r"^weight_storage 'int8_weight_only': to\(torch.float16\) cannot convert "
                                         "the int8 weights"):
        transformer.to(torch.float16)
    with pytest.raises(UsageError, match="^weight_storage 'int8_weight_only': save_pretrained cannot write the int8"):
        fresh_tiny.pipe.save_pretrained("never-written")
    with pytest.raises(UsageError, match="^profile.weight_storage: 'int8_weight_only' with offload 'group'"):
        Profile(weight_storage="int8_weight_only", offload="group").validate()


# ---- offload (hooks on the CPU; the memory they save is measured on a GPU) ---------------------------------------

def test_group_offload_hooks_the_transformer_blocks_and_renders_the_same_image(fresh_tiny, workload):
    from diffusers.hooks import group_offloading

    reference = _render(fresh_tiny, workload)
    levers.apply_offload(fresh_tiny.pipe, Profile(offload="group", offload_blocks_per_group=2))
    transformer = fresh_tiny.pipe.transformer
    assert group_offloading._is_group_offload_enabled(transformer)
    assert group_offloading._get_group_onload_device(transformer) == torch.device("cpu")
    # Groups of two blocks: every other block leads a group that onloads it and its neighbour.
    leaders = [block for block in transformer.transformer_blocks
               if block._diffusers_hook.get_hook("group_offloading").group.onload_leader is block]
    assert len(leaders) == len(transformer.transformer_blocks) // 2
    np.testing.assert_array_equal(_render(fresh_tiny, workload), reference)


def test_model_offload_hooks_every_component_and_renders_the_same_image(fresh_tiny, workload):
    reference = _render(fresh_tiny, workload)
    levers.apply_offload(fresh_tiny.pipe, Profile(offload="model"))
    pipe = fresh_tiny.pipe
    hooked = {name for name, component in pipe.components.items() if hasattr(component, "_hf_hook")}
    assert hooked == {"text_encoder", "transformer", "vae"} and len(pipe._all_hooks) == 3
    np.testing.assert_array_equal(_render(fresh_tiny, workload), reference)


def test_sequential_offload_keeps_the_weights_off_the_device_and_hooks_each_layer(fresh_tiny):
    """Hooks only: accelerate cannot run a pipeline whose execution device is the CPU under sequential offload
    (its post-forward re-wraps a plain tensor as a Parameter and fails), so no image is rendered here."""
    levers.apply_offload(fresh_tiny.pipe, Profile(offload="sequential"))
    transformer = fresh_tiny.pipe.transformer
    assert {p.device.type for p in transformer.parameters()} == {"meta"}
    linear = transformer.transformer_blocks[0].img_mlp.net[2]
    assert linear._hf_hook.execution_device.type == "cpu" and linear._hf_hook.offload


def test_offload_compiles_without_fullgraph_only_where_hooks_sit_in_the_blocks(fresh_tiny, recorded_compiles):
    levers.optimize(fresh_tiny.pipe, Profile(offload="group", compile="regional"))
    levers.optimize(models.load_model("tiny", "cpu", "float32").pipe, Profile(offload="model", compile="regional"))
    blocks = len(fresh_tiny.pipe.transformer.transformer_blocks)
    assert [options["fullgraph"] for options in recorded_compiles] == [False] * blocks + [True] * blocks


# ---- text encoder placement ---------------------------------------------------------------------------------

def test_offloaded_text_encoder_is_one_offload_group_and_encodes_the_same(fresh_tiny, workload):
    from diffusers.hooks import group_offloading

    reference = _render(fresh_tiny, workload)
    levers.apply_text_encoder(fresh_tiny.pipe, Profile(text_encoder="offload"))
    encoder = fresh_tiny.pipe.text_encoder
    # No block list at its top level: the whole encoder is one group, onloaded for its forward, offloaded after.
    group = group_offloading._get_top_level_group_offload_hook(encoder).group
    assert group.onload_leader is group.offload_leader is encoder
    assert group.modules == list(encoder.children())
    assert not group_offloading._is_group_offload_enabled(fresh_tiny.pipe.transformer)
    np.testing.assert_array_equal(_render(fresh_tiny, workload), reference)


def test_cpu_text_encoder_is_hooked_to_run_on_the_cpu_and_encodes_the_same(fresh_tiny, workload):
    """On this machine the CPU is also where the pipeline runs: what is checked is the hook, not a move."""
    reference = _render(fresh_tiny, workload)
    levers.apply_text_encoder(fresh_tiny.pipe, Profile(text_encoder="cpu"))
    hook = fresh_tiny.pipe.text_encoder._hf_hook
    assert hook.execution_device == torch.device("cpu") and hook.io_same_device
    # The pipeline's execution device is not taken from this hook.
    assert "text_encoder" in fresh_tiny.pipe._exclude_from_cpu_offload
    assert "text_encoder" not in type(fresh_tiny.pipe)._exclude_from_cpu_offload
    np.testing.assert_array_equal(_render(fresh_tiny, workload), reference)


@pytest.mark.parametrize("placement", ["offload", "cpu"])
def test_text_encoder_placement_skips_a_pipeline_without_one(placement):
    # synthetic's pipeline: prompts arrive as embeddings, text_encoder=None
    pipe = types.SimpleNamespace(text_encoder=None)
    assert levers.apply_text_encoder(pipe, Profile(text_encoder=placement)) is pipe
    assert vars(pipe) == {"text_encoder": None}


# ---- refusals, before anything loads ------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"offload": "sequential", "compile": "regional"},
     r"^profile\.offload: 'sequential' moves each layer's weights in at its call, which compile 'regional' cannot"),
    ({"offload": "group", "parallel": "ulysses", "gpus": 2, "compile": "regional"},
     r"^profile\.offload: 'group' cannot be combined with parallel 'ulysses'$"),
    ({"offload": "model", "parallel": "cfg", "gpus": 2},
     r"^profile\.offload: 'model' cannot be combined with parallel 'cfg'$"),
    ({"offload_blocks_per_group": 2}, r"^profile\.offload_blocks_per_group: set without offload = group$"),
    ({"offload": "model", "offload_blocks_per_group": 2}, r"^profile\.offload_blocks_per_group: set without"),
    ({"weight_storage": "fp8_storage", "quantization": "fp8_weight_only"},
     r"^profile\.weight_storage: 'fp8_storage' and quantization 'fp8_weight_only' both replace the transformer's "),
    ({"text_encoder": "offload", "offload": "model"},
     r"^profile\.text_encoder: 'offload' with offload 'model', which already moves the text encoder"),
    ({"text_encoder": "cpu", "offload": "sequential"}, r"^profile\.text_encoder: 'cpu' with offload 'sequential'"),
    ({"offload": "somewhere"}, r"^profile\.offload: 'somewhere' is not one of none, group, model, sequential$"),
    ({"offload": "group", "offload_blocks_per_group": 0}, r"^profile\.offload_blocks_per_group: must be an integer"),
])
def test_memory_combinations_that_cannot_work_are_refused_in_one_line(fields, message):
    with pytest.raises(UsageError, match=message) as refused:
        Profile(**fields).validate()
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("fields", [{"offload": "group", "compile": "regional"},
                                    {"offload": "model", "compile": "full"},
                                    {"weight_storage": "fp8_storage", "offload": "group", "text_encoder": "offload"},
                                    {"text_encoder": "cpu", "offload": "group", "vae_decode": "tiled"}])
def test_memory_combinations_that_can_work_are_allowed(fields):
    Profile(**fields).validate()


@pytest.mark.parametrize("fields, message", [
    ({"offload": "group"}, r"^offload 'group' moves weights between the CPU and a GPU; this machine runs on the CPU$"),
    ({"offload": "sequential"}, r"^offload 'sequential' moves weights"),
    ({"text_encoder": "offload"}, r"^text_encoder 'offload' keeps it off a GPU; this machine runs on the CPU already$"),
])
def test_offload_needs_a_gpu_and_is_refused_before_the_model_loads(tiny_workload, monkeypatch, fields, message):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the profile was checked")

    monkeypatch.setattr(models, "load_model", must_not_load)
    with pytest.raises(UnavailableLever, match=message):
        runner.build(tiny_workload, Profile(**fields), Capabilities(device="cpu"))
    # The same profile passes on a CUDA machine, and CPU-side levers pass here.
    check_runnable(Profile(**fields), tiny_workload, Capabilities(device="cuda"))
    check_runnable(Profile(vae_decode="tiled", weight_storage="fp8_storage"), tiny_workload,
                   Capabilities(device="cpu"))


# ---- the table: describe, locks, order, the pool ------------------------------------------------------------

def test_memory_settings_are_described_only_when_not_the_default():
    assert Profile().describe() == "attn=native"
    profile = Profile(weight_storage="fp8_storage", offload="group", offload_blocks_per_group=4,
                      text_encoder="offload", vae_decode="tiled")
    assert profile.describe() == "attn=native fp8-storage offload=group(4) te=offload vae=tiled"
    assert Profile(offload="group").describe() == "attn=native offload=group(1)"
    assert Profile(offload="sequential", text_encoder="resident", vae_decode="sliced").describe() == (
        "attn=native offload=sequential vae=sliced")


def test_memory_fields_round_trip_through_a_lock_and_older_locks_stay_valid(tmp_path):
    from tests.test_lockfile import make_lock

    memory = {"weight_storage": "fp8_storage", "offload": "group", "offload_blocks_per_group": 3,
              "text_encoder": "cpu", "vae_decode": "sliced"}
    profile = Profile(**memory)
    assert Profile.from_dict(profile.to_dict()) == profile
    assert Profile.from_text(",".join(f"{k}={v}" for k, v in memory.items())) == profile
    # At their defaults they stay out of a lock, which reads as before the fields existed.
    assert not set(memory) & set(Profile().to_dict())

    path = tmp_path / "qwendoctor.lock"
    lock = make_lock(profile=profile)
    lockfile.write_lock(path, lock)
    assert lockfile.read_lock(path) == lock
    assert 'offload = "group"' in path.read_text()
    plain = tmp_path / "plain.lock"
    lockfile.write_lock(plain, make_lock())
    assert not any(name in plain.read_text() for name in memory)
    assert lockfile.read_lock(plain).profile.offload == "none"


def test_memory_levers_sit_in_the_documented_order_and_are_not_searched():
    import re

    names = [lever.name for lever in levers.LEVERS]
    assert names == ["tf32", "attention_backend", "real_rope", "lora", "distilled", "fused_qkv", "gelu_epilogue",
                     "quantization", "weight_storage", "cache", "offload", "text_encoder", "context_parallel", "compile",
                     "cfg_batching", "cfg_parallel", "vae_decode", "steps"]
    # The module docstring's numbered list: "  7. weight storage     diffusers' layerwise casting ..."
    documented = re.findall(r"^\s*\d+\.\s+(\S+(?: \S+)?)\s{2,}", levers.__doc__, flags=re.MULTILINE)
    assert [name.lower().replace(" ", "_") for name in documented] == names
    memory = {"weight_storage", "offload", "text_encoder", "vae_decode"}
    assert not memory & {lever.name for lever in levers.SEARCH_ORDER}
    for lever in levers.LEVERS:
        if lever.name in memory:
            offer = lever.offer(None)
            assert all(values == (field.default,) for field, values in zip(lever.fields, offer.values.values()))
            assert Profile(**lever.sample(None, offer, {}, None)) == Profile()


def test_what_cannot_be_undone_is_baked_and_undoable_flags_are_truthful():
    assert levers.baked_part(Profile(vae_decode="tiled")) is None
    assert levers.baked_part(Profile(offload="group", offload_blocks_per_group=2)) == {
        "offload": "group", "offload_blocks_per_group": 2}
    assert levers.baked_part(Profile(weight_storage="fp8_storage")) == {"weight_storage": "fp8_storage"}
    assert {lever.name for lever in levers.LEVERS if lever.pipeline_wide} == {"offload", "text_encoder"}


def test_pool_builds_a_new_pipeline_after_a_pipeline_wide_lever_and_a_new_transformer_after_fp8_storage(
        tiny_workload):
    loads = []

    def load(model, device, dtype, on_cpu=frozenset(), task="generate"):
        # Offload is refused on a CPU machine: the pool is told it has a GPU and builds on the CPU regardless.
        loads.append(model)
        return models.load_model(model, "cpu", dtype)

    the_pool = pool.ModelPool(tiny_workload, Capabilities(device="cuda"), load=load)
    first = the_pool.prepare(Profile(offload="model", text_encoder="resident"))
    assert first.how == "loaded" and hasattr(first.model.pipe.transformer, "_hf_hook")
    assert the_pool.prepare(Profile(offload="model", steps=3)).how == "reused"
    plain = the_pool.prepare(Profile())
    assert plain.how == "reloaded" and len(loads) == 2 and plain.model is not first.model
    assert not any(hasattr(c, "_hf_hook") for c in plain.model.pipe.components.values())

    stored = the_pool.prepare(Profile(weight_storage="fp8_storage"))
    assert stored.how == "re-applied"
    back = the_pool.prepare(Profile())
    assert back.how == "replaced" and len(loads) == 2
    assert {p.dtype for p in back.model.pipe.transformer.parameters()} == {torch.float32}
