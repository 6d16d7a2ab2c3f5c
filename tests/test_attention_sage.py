"""SageAttention's `sageattn` registered through diffusers' dispatcher as "sageattn", exercised on the CPU with a
stand-in module (the real package's Triton kernels need a GPU: tests/gpu/test_attention_sage_gpu.py).

The stand-in quantizes q and k to int8 per tensor, as 8-bit attention does (coarser than SageAttention's
per-block scales), then runs SDPA in [B, S, H, D] layout: the image it draws is close to native's, not equal.
"""

import importlib.machinery
import sys
import types

import numpy as np
import pytest
import torch

from qwendoctor import levers, models, runner
from qwendoctor.levers import attention
from qwendoctor.errors import UnavailableLever
from qwendoctor.profile import Capabilities, Profile, check_runnable


def _int8(x):
    scale = x.abs().amax().clamp(min=1e-8) / 127
    return (x / scale).round().clamp(-127, 127) * scale


@pytest.fixture
def fake_sage(monkeypatch):
    calls = []

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, **kwargs):
        calls.append({"layout": tensor_layout, "shape": tuple(q.shape), "scale": sm_scale})
        assert tensor_layout == "NHD"
        out = torch.nn.functional.scaled_dot_product_attention(
            _int8(q).transpose(1, 2), _int8(k).transpose(1, 2), v.transpose(1, 2), scale=sm_scale,
            is_causal=is_causal)
        return out.transpose(1, 2)

    from diffusers.models import attention_dispatch  # decides what is installed before the stand-in exists

    module = types.ModuleType("sageattention")
    module.sageattn = sageattn
    module.__spec__ = importlib.machinery.ModuleSpec("sageattention", None)
    monkeypatch.setitem(sys.modules, "sageattention", module)
    # set_attention_backend also sets diffusers' process-wide active backend, which a processor that was never
    # given one uses: left at "sageattn", a later test's fresh model would call the stand-in after it is gone.
    registry = attention_dispatch._AttentionBackendRegistry
    monkeypatch.setattr(registry, "_active_backend", registry._active_backend)
    return calls


def test_sageattn_is_refused_with_the_install_command_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "sageattention", None)  # import fails
    assert attention.register_sageattn_backend() is False
    with pytest.raises(RuntimeError, match=r"needs sageattention \(sageattention\), which does not import here: "
                                           r"pip install sageattention$"):
        attention.ensure_backend("sageattn")


def test_sageattn_draws_close_to_native_and_is_lossy(fake_sage, tiny_workload):
    model = models.load_model("tiny", "cpu", "float32")
    # Explicitly native, as optimize() always sets it: diffusers' process-wide active backend (which a processor
    # never given one uses) may still be another test's.
    levers.apply_attention_backend(model.pipe, Profile())
    reference = runner.render(model, tiny_workload, Profile(), "a fox", 0)
    levers.apply_attention_backend(model.pipe, Profile(attention_backend="sageattn"))
    image = runner.render(model, tiny_workload, Profile(), "a fox", 0)
    assert fake_sage and fake_sage[0]["layout"] == "NHD" and fake_sage[0]["shape"][2:] == (4, 16)
    assert fake_sage[0]["scale"] == pytest.approx(16 ** -0.5)
    difference = np.abs(image.astype(np.float64) - reference)
    assert 0 < difference.max() and difference.mean() < 0.05  # quantized q/k: close, not equal
    assert levers.is_lossy(Profile(attention_backend="sageattn"))
    assert not levers.is_lossy(Profile(attention_backend="_native_cudnn"))
    assert attention.register_sageattn_backend() is True  # idempotent


def test_sageattn_compiles_with_fullgraph(fake_sage):
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    assert attention.register_sageattn_backend()
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    compiled = torch.compile(lambda a, b, c: dispatch_attention_fn(a, b, c, backend="sageattn"), fullgraph=True,
                             backend="eager")
    expected = dispatch_attention_fn(q, k, v, backend="sageattn")
    assert torch.allclose(compiled(q, k, v), expected, atol=1e-6)
    assert len(fake_sage) == 2


def test_a_lock_or_profile_asking_for_sageattn_where_it_did_not_pass_names_the_install_command(tiny_workload):
    gpu = Capabilities(device="cuda", compute_capability=(9, 0), working_attention_backends=("native",))
    with pytest.raises(UnavailableLever, match=r"^attention backend 'sageattn' did not pass the check here "
                                               r"\(working: native\); it needs sageattention: "
                                               r"pip install sageattention$"):
        check_runnable(Profile(attention_backend="sageattn"), tiny_workload, gpu)
    with pytest.raises(UnavailableLever, match=r"needs a CUDA GPU; this machine runs on the CPU"):
        check_runnable(Profile(attention_backend="sageattn"), tiny_workload, Capabilities(device="cpu"))


def test_a_fast_8bit_kernel_never_pushes_exact_ones_out_of_the_search():
    """The slack rule compares kernels of one kind: the 8-bit kernel may miss the floor, so cuDNN at 1.5x its
    time stays in the space, while flash at 1.3x cuDNN's is left out as before."""
    timed = {"native": 1.0, "_native_cudnn": 1.0, "_native_flash": 1.3, "sageattn": 0.66}
    slow = levers._slower_than_slack(("native", "_native_cudnn", "_native_flash", "sageattn"), timed)
    assert slow == ("_native_flash",)


def test_attention_truth_calls_sageattn_in_diffusers_layout_and_never_recommends_it():
    from probes import attention_truth

    shape = {"B": 1, "H": 24, "S": 4096, "D": 128}
    finding = attention_truth.summarize(shape, {"native": 1.0, "sage": 0.5, "cudnn": 0.98}, {}, "cudnn",
                                        "cudnn_kernel", None, errors={"sage": 0.03, "cudnn": 0.001})
    assert finding.measured["best"] == "cudnn"  # the fastest exact kernel; sage is 8-bit: not this finding's to pick
    assert any(line.startswith("sage: 0.500 ms") and "8-bit (lossy" in line for line in finding.details)
