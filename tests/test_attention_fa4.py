"""The FA4 backend registered through diffusers' dispatcher, exercised on the CPU with a stand-in module.

The stand-in computes attention with SDPA math in FA4's [B, S, H, D] layout and returns (out, lse) as
flash-attn-4 does; the real package runs in tests/gpu and benchmarks/fa4.
"""

import sys
import types

import numpy as np
import pytest
import torch

from qwendoctor import levers, models, runner
from qwendoctor.levers import attention
from qwendoctor.profile import Profile


@pytest.fixture
def fake_fa4(monkeypatch):
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        calls.append(tuple(q.shape))
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale, is_causal=causal)
        return out.transpose(1, 2), None

    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func
    package = types.ModuleType("flash_attn")
    package.cute = cute
    # Libraries probe for flash_attn with importlib.util.find_spec, which needs a spec. Import diffusers'
    # dispatcher first, so it decides what is installed before the stand-in exists (as without flash-attn 2).
    import importlib.machinery

    import diffusers.models.attention_dispatch  # noqa: F401

    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)
    cute.__spec__ = importlib.machinery.ModuleSpec("flash_attn.cute", None)
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    # set_attention_backend also sets diffusers' process-wide active backend, which a processor never given one
    # uses: left at "fa4", a later test's fresh model would call the stand-in after it is gone.
    registry = diffusers.models.attention_dispatch._AttentionBackendRegistry
    monkeypatch.setattr(registry, "_active_backend", registry._active_backend)
    return calls


def test_fa4_is_refused_with_the_install_command_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails
    assert attention.register_fa4_backend() is False
    with pytest.raises(RuntimeError, match="install_flash_attention.sh --which fa4"):
        attention.ensure_backend("fa4")


def test_fa4_backend_runs_the_tiny_pipeline_like_native(fake_fa4, tiny_workload):
    model = models.load_model("tiny", "cpu", "float32")
    reference = runner.render(model, tiny_workload, Profile(), "a fox", 0)
    levers.apply_attention_backend(model.pipe, Profile(attention_backend="fa4"))
    image = runner.render(model, tiny_workload, Profile(), "a fox", 0)
    assert fake_fa4, "the registered FA4 function was never called"
    assert fake_fa4[0][2:] == (4, 16)  # [B, S, H=4, D=16]: FA4's layout, as the dispatcher hands it over
    assert np.abs(image - reference).max() < 1e-4
    assert attention.register_fa4_backend() is True  # idempotent


def test_fa4_backend_refuses_a_mask(fake_fa4):
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    assert attention.register_fa4_backend()
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="no attention mask"):
        dispatch_attention_fn(q, q, q, attn_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool), backend="fa4")


def test_fa4_backend_compiles_with_fullgraph(fake_fa4):
    """Regional compile uses fullgraph=True: FA4 must be one opaque op in the graph, not a graph break into
    the CuTe DSL. (backend="eager": dynamo's tracing is what is tested, not inductor's code generation.)"""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    assert attention.register_fa4_backend()
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    compiled = torch.compile(lambda a, b, c: dispatch_attention_fn(a, b, c, backend="fa4"), fullgraph=True,
                             backend="eager")
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(compiled(q, k, v), expected, atol=1e-5)
    assert fake_fa4, "the stand-in kernel did not run"
