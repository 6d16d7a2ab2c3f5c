"""The fused q/k/v lever on the tiny model: one projection per stream, the same images, diffusers' contract kept."""

import numpy as np
import pytest
import torch

from qwendoctor import levers, models, runner
from qwendoctor.levers import fused_qkv as fused_projections
from qwendoctor.errors import UsageError
from qwendoctor.profile import Profile

PROMPT = "a large red circle at the top left on a blue background"


@pytest.fixture
def fresh_tiny():
    return models.load_model("tiny", "cpu", "float32")


def _attentions(pipe):
    return [m for m in pipe.transformer.modules() if hasattr(m, "processor")]


def _render(model, workload, profile=Profile()):
    return runner.render(model, workload, profile, PROMPT, 0)


def test_fusing_leaves_one_linear_per_stream_with_the_same_parameters_and_images(fresh_tiny, tiny_workload):
    reference = _render(fresh_tiny, tiny_workload)
    count = sum(p.numel() for p in fresh_tiny.pipe.transformer.parameters())
    levers.apply_fused_qkv(fresh_tiny.pipe, Profile(fused_qkv=True))
    attentions = _attentions(fresh_tiny.pipe)
    assert attentions and all(fused_projections.is_fused(a) for a in attentions)
    for attention in attentions:
        names = {name for name, _ in attention.named_children()}
        assert {"to_qkv", "to_added_qkv"} <= names
        assert not names & {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"}
        assert attention.to_qkv.out_features == 3 * attention.inner_dim
    # The unfused Linears are gone, not kept beside the fused ones: no second copy of the weights.
    assert sum(p.numel() for p in fresh_tiny.pipe.transformer.parameters()) == count
    fused = _render(fresh_tiny, tiny_workload, Profile(fused_qkv=True))
    # One GEMM where there were three: float32 agreement to rounding.
    assert np.abs(fused.astype(np.float64) - reference).max() < 1e-3


def test_fusing_twice_changes_nothing_and_the_default_leaves_the_transformer_alone(fresh_tiny):
    before = [type(a.processor) for a in _attentions(fresh_tiny.pipe)]
    levers.apply_fused_qkv(fresh_tiny.pipe, Profile())
    assert [type(a.processor) for a in _attentions(fresh_tiny.pipe)] == before
    levers.apply_fused_qkv(fresh_tiny.pipe, Profile(fused_qkv=True))
    weights = [a.to_qkv.weight for a in _attentions(fresh_tiny.pipe)]
    levers.apply_fused_qkv(fresh_tiny.pipe, Profile(fused_qkv=True))
    assert [a.to_qkv.weight for a in _attentions(fresh_tiny.pipe)] == weights


def test_the_attention_backend_and_real_rope_still_reach_the_fused_processor(fresh_tiny, tiny_workload):
    """Both levers act on diffusers' processor: the backend is an attribute of its instance, RoPE a function of
    its module. The fused processor keeps the one and looks the other up at call time."""
    from diffusers.models.transformers import transformer_qwenimage

    from qwendoctor.levers import real_rope as rope

    levers.apply_attention_backend(fresh_tiny.pipe, Profile(attention_backend="_native_math"))
    levers.apply_fused_qkv(fresh_tiny.pipe, Profile(fused_qkv=True))
    assert {str(getattr(a.processor._attention_backend, "value", a.processor._attention_backend))
            for a in _attentions(fresh_tiny.pipe)} == {"_native_math"}
    calls = []
    real = rope.apply_rotary_emb_qwen_real

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    try:
        rope.enable()
        original = transformer_qwenimage.apply_rotary_emb_qwen
        transformer_qwenimage.apply_rotary_emb_qwen = counted
        _render(fresh_tiny, tiny_workload, Profile(fused_qkv=True, real_rope=True))
    finally:
        transformer_qwenimage.apply_rotary_emb_qwen = original
        rope.disable()
    assert calls  # four per block and step, through the module's name


def test_the_state_dict_has_diffusers_keys_and_loads_back_into_a_fused_transformer(fresh_tiny):
    unfused = fresh_tiny.pipe.transformer.state_dict()
    levers.apply_fused_qkv(fresh_tiny.pipe, Profile(fused_qkv=True))
    saved = fresh_tiny.pipe.transformer.state_dict()
    assert saved.keys() == unfused.keys()
    for key, value in unfused.items():
        assert torch.equal(saved[key], value), key
    # Copies: safetensors refuses tensors that share memory.
    first = next(k for k in saved if k.endswith("attn.to_q.weight"))
    key = saved[first.replace("to_q", "to_k")]
    assert saved[first].untyped_storage().data_ptr() != key.untyped_storage().data_ptr()
    attention = _attentions(fresh_tiny.pipe)[0]
    attention.to_qkv.weight.data.zero_()
    fresh_tiny.pipe.transformer.load_state_dict(unfused)
    assert torch.equal(attention.to_qkv.weight, torch.cat([unfused[first], unfused[first.replace("to_q", "to_k")],
                                                           unfused[first.replace("to_q", "to_v")]]))


def test_save_pretrained_writes_a_checkpoint_plain_diffusers_loads(fresh_tiny, tiny_workload, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    levers.apply_fused_qkv(fresh_tiny.pipe, Profile(fused_qkv=True))
    fused = _render(fresh_tiny, tiny_workload, Profile(fused_qkv=True))
    fresh_tiny.pipe.transformer.save_pretrained(tmp_path / "transformer")
    fresh_tiny.pipe.transformer = QwenImageTransformer2DModel.from_pretrained(tmp_path / "transformer")
    assert not any(fused_projections.is_fused(a) for a in _attentions(fresh_tiny.pipe))
    plain = _render(fresh_tiny, tiny_workload)
    assert np.abs(plain.astype(np.float64) - fused).max() < 1e-3


def test_a_transformer_without_qwen_attention_is_refused_in_one_line(fresh_tiny):
    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

    fresh_tiny.pipe.transformer = Other()
    with pytest.raises(UsageError, match=r"^profile\.fused_qkv: this transformer has no Qwen-Image attention"):
        levers.apply_fused_qkv(fresh_tiny.pipe, Profile(fused_qkv=True))


def test_a_pipeline_without_a_transformer_refuses_fusion_and_ignores_the_default(fresh_tiny):
    fresh_tiny.pipe.transformer = None
    assert levers.apply_fused_qkv(fresh_tiny.pipe, Profile()) is fresh_tiny.pipe
    with pytest.raises(UsageError, match=r"^profile\.fused_qkv = True changes the pipeline's transformer"):
        levers.apply_fused_qkv(fresh_tiny.pipe, Profile(fused_qkv=True))


def test_fusion_is_lossless_baked_and_searched(tiny_workload):
    from qwendoctor import space
    from qwendoctor.profile import Capabilities

    search = space.build_search_space(Capabilities(device="cpu", working_attention_backends=("native",)),
                                      tiny_workload, evidence=lambda rule: None)
    assert search.values("fused_qkv") == (False, True)
    assert not levers.is_lossy(Profile(fused_qkv=True))
    assert levers.baked_part(Profile(fused_qkv=True)) == {"fused_qkv": True}
    assert levers.FUSED_QKV in levers.SEARCH_ORDER
    assert Profile.from_dict({"fused_qkv": True}).describe() == "attn=native fused-qkv"


@pytest.mark.parametrize("others", [
    {"cfg_batching": True, "cache": "first_block", "cache_threshold": 0.05},
    {"weight_storage": "fp8_storage"},
    {"weight_storage": "int8_weight_only"},
], ids=["cfg-batching+first-block", "fp8-storage", "int8-storage"])
def test_fusion_composes_with_the_levers_applied_after_it(tiny_workload, others):
    """Levers later in the order act on the fused Linears (FP8 storage casts `to_qkv`, int8 quantizes it); each
    profile draws with fusion what it draws without."""
    if others.get("weight_storage") == "int8_weight_only":
        pytest.importorskip("torchao")
    images = []
    for fused in (False, True):
        model = models.load_model("tiny", "cpu", "float32")
        profile = Profile(fused_qkv=fused, **others)
        levers.optimize(model.pipe, profile, workload=tiny_workload)
        images.append(_render(model, tiny_workload, profile).astype(np.float64))
    weights = [a.to_qkv.weight for a in _attentions(model.pipe)]
    if others.get("weight_storage") == "fp8_storage":
        assert {w.dtype for w in weights} == {torch.float8_e4m3fn}
    if others.get("weight_storage") == "int8_weight_only":
        assert {type(w).__name__ for w in weights} == {"Int8Tensor"}
    assert np.abs(images[1] - images[0]).max() < 1e-2
