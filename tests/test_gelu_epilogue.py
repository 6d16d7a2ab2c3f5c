"""The GELU-epilogue lever on the CPU: which modules it swaps, that every MLP then runs through torch's fused
`_addmm_activation` with the arguments cuBLASLt needs, that Inductor keeps that op whole, and its refusals.

On the CPU the op computes the exact GELU (cuBLASLt, on CUDA, the tanh one Qwen-Image uses), so the images here come
from a stand-in with CUDA's semantics: these tests check the plumbing. The op's own numerics on CUDA, and that no
GELU kernel is left beside the GEMM there, are tests/gpu/test_gelu_epilogue_gpu.py's."""

import numpy as np
import pytest
import torch

from qwendoctor import levers, models, runner, space
from qwendoctor.levers import gelu_epilogue
from qwendoctor.errors import UnavailableLever, UsageError
from qwendoctor.profile import Capabilities, Profile

PROMPT = "a large red circle at the top left on a blue background"


@pytest.fixture
def fresh_tiny():
    return models.load_model("tiny", "cpu", "float32")


@pytest.fixture
def cuda_semantics(monkeypatch):
    """torch._addmm_activation as CUDA computes it (bias, GEMM, then the tanh GELU), recording each call."""
    calls = []

    def stand_in(bias, mat1, mat2, beta=1, alpha=1, use_gelu=False):
        calls.append({"bias": tuple(bias.shape), "mat1": tuple(mat1.shape), "mat2": tuple(mat2.shape),
                      "use_gelu": use_gelu, "beta": beta, "alpha": alpha})
        return torch.nn.functional.gelu(torch.addmm(bias, mat1, mat2), approximate="tanh")

    monkeypatch.setattr(torch, "_addmm_activation", stand_in)
    return calls


def _mlps(pipe):
    return [m for m in pipe.transformer.modules() if type(m).__name__ in ("GELU", "EpilogueGELU")]


def test_every_tanh_gelu_mlp_is_swapped_and_keeps_its_parameters_and_state_dict(fresh_tiny):
    transformer = fresh_tiny.pipe.transformer
    before = transformer.state_dict()
    parameters = [id(p) for p in transformer.parameters()]
    levers.apply_gelu_epilogue(fresh_tiny.pipe, Profile(gelu_epilogue=True))
    mlps = _mlps(fresh_tiny.pipe)
    # two MLPs per block, image and text stream
    assert len(mlps) == 2 * len(transformer.transformer_blocks)
    assert all(gelu_epilogue.is_fused(m) and isinstance(m.proj, torch.nn.Linear) for m in mlps)
    assert [id(p) for p in transformer.parameters()] == parameters
    after = transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_every_mlp_runs_through_the_fused_op_and_draws_the_same_image(fresh_tiny, tiny_workload, cuda_semantics):
    reference = runner.render(models.load_model("tiny", "cpu", "float32"), tiny_workload, Profile(), PROMPT, 0)
    levers.apply_gelu_epilogue(fresh_tiny.pipe, Profile(gelu_epilogue=True))
    image = runner.render(fresh_tiny, tiny_workload, Profile(gelu_epilogue=True), PROMPT, 0)
    blocks = len(fresh_tiny.pipe.transformer.transformer_blocks)
    passes = 2 if tiny_workload.does_cfg else 1
    assert len(cuda_semantics) == 2 * blocks * tiny_workload.reference_steps * passes
    inner = fresh_tiny.pipe.transformer.transformer_blocks[0].img_mlp.net[0].proj
    for call in cuda_semantics:
        # GELU_BIAS wants a 1-D bias over the output features, a 2-D input and the weight as (in, out)
        assert call["use_gelu"] and call["beta"] == 1 and call["alpha"] == 1
        assert call["bias"] == (inner.out_features,) and len(call["mat1"]) == 2
        assert call["mat2"] == (inner.in_features, inner.out_features)
    assert np.abs(image.astype(np.float64) - reference).max() < 1e-5


def test_fusing_twice_changes_nothing_and_the_default_leaves_the_mlps_alone(fresh_tiny):
    levers.apply_gelu_epilogue(fresh_tiny.pipe, Profile())
    assert not any(gelu_epilogue.is_fused(m) for m in _mlps(fresh_tiny.pipe))
    levers.apply_gelu_epilogue(fresh_tiny.pipe, Profile(gelu_epilogue=True))
    assert gelu_epilogue.fuse(fresh_tiny.pipe.transformer) == 0
    levers.apply_gelu_epilogue(fresh_tiny.pipe, Profile(gelu_epilogue=True))  # no error: already fused


def test_inductor_keeps_the_fused_op_whole_with_no_gelu_kernel_beside_it():
    """Regional compile traces the blocks: the op must reach the compiled code as one call, not be decomposed
    back into a GEMM and a GELU kernel, or the lever removes nothing under compile."""
    from diffusers.models.attention import FeedForward
    from torch._inductor.utils import run_and_get_code

    mlp = FeedForward(dim=64, dim_out=64, activation_fn="gelu-approximate")
    assert gelu_epilogue.fuse(mlp) == 1
    hidden = torch.randn(2, 40, 64)
    compiled = torch.compile(mlp, fullgraph=True)
    with torch.no_grad():
        _, codes = run_and_get_code(compiled, hidden)
    code = "\n".join(codes)
    assert "aten._addmm_activation" in code and "use_gelu=True" in code
    kernels = [line.split("=")[0].strip() for line in code.splitlines()
               if "async_compile." in line and "=" in line]
    assert not [k for k in kernels if "gelu" in k], kernels


def test_fp8_storage_casts_the_fused_linear_up_before_its_forward(tiny_workload, cuda_semantics):
    """diffusers' layerwise casting hooks the Linear; the swap keeps it a Linear called as a module, so the hook
    still casts the FP8-stored weight up first: the same image as FP8 storage without the lever."""
    images = []
    for fused in (False, True):
        model = models.load_model("tiny", "cpu", "float32")
        profile = Profile(gelu_epilogue=fused, weight_storage="fp8_storage")
        levers.optimize(model.pipe, profile, workload=tiny_workload)
        images.append(runner.render(model, tiny_workload, profile, PROMPT, 0).astype(np.float64))
    assert cuda_semantics and {p.dtype for m in _mlps(model.pipe) for p in m.proj.parameters()} == {
        torch.float8_e4m3fn}
    assert np.abs(images[1] - images[0]).max() < 1e-5


@pytest.mark.parametrize("others, message", [
    ({"quantization": "fp8_rowwise"}, r"^profile\.gelu_epilogue: quantization=fp8_rowwise replaces the MLP's "
                                      r"weights by torchao tensors, which have no GELU epilogue"),
    ({"weight_storage": "int8_weight_only"}, r"^profile\.gelu_epilogue: weight_storage=int8_weight_only replaces"),
])
def test_torchao_weights_are_refused_in_one_line_before_anything_loads(others, message):
    with pytest.raises(UsageError, match=message):
        Profile(gelu_epilogue=True, **others).validate()


def test_the_cpu_is_refused_since_its_op_computes_another_gelu(tiny_workload):
    cpu = Capabilities(device="cpu", working_attention_backends=("native",))
    with pytest.raises(UnavailableLever, match=r"^gelu_epilogue needs a CUDA GPU \(cuBLASLt's GELU epilogue\)"):
        levers.GELU_EPILOGUE.runnable(Profile(gelu_epilogue=True), tiny_workload, cpu)
    levers.GELU_EPILOGUE.runnable(Profile(), tiny_workload, cpu)  # the default runs anywhere
    # why: the CPU op is the exact GELU, which the tanh GELU differs from by more than rounding
    x, w, b = torch.randn(8, 16, dtype=torch.float64), torch.randn(24, 16, dtype=torch.float64), torch.randn(24)
    exact = torch._addmm_activation(b.double(), x, w.t(), use_gelu=True)
    tanh = torch.nn.functional.gelu(torch.addmm(b.double(), x, w.t()), approximate="tanh")
    assert (exact - tanh).abs().max() > 1e-6


def test_a_transformer_without_a_tanh_gelu_mlp_is_refused(fresh_tiny):
    for module in _mlps(fresh_tiny.pipe):
        module.approximate = "none"
    with pytest.raises(UsageError, match=r"^profile\.gelu_epilogue: this transformer has no MLP with a biased "
                                         r"projection and a tanh GELU"):
        levers.apply_gelu_epilogue(fresh_tiny.pipe, Profile(gelu_epilogue=True))
    fresh_tiny.pipe.transformer = None
    assert levers.apply_gelu_epilogue(fresh_tiny.pipe, Profile()) is fresh_tiny.pipe
    with pytest.raises(UsageError, match=r"^profile\.gelu_epilogue = True changes the pipeline's transformer"):
        levers.apply_gelu_epilogue(fresh_tiny.pipe, Profile(gelu_epilogue=True))


def test_lossless_baked_and_searched_on_a_gpu_only_without_torchao_weights(tiny_workload):
    assert not levers.is_lossy(Profile(gelu_epilogue=True))
    assert levers.baked_part(Profile(gelu_epilogue=True)) == {"gelu_epilogue": True}
    assert Profile.from_dict({"gelu_epilogue": True}).describe() == "attn=native gelu-epilogue"
    assert "gelu_epilogue" not in Profile().to_dict()  # older locks read and write unchanged
    cpu = Capabilities(device="cpu", working_attention_backends=("native",))
    gpu = Capabilities(device="cuda", compute_capability=(9, 0), has_torchao=True, compile_works=True,
                       working_attention_backends=("native",))
    assert space.build_search_space(cpu, tiny_workload, evidence=lambda rule: None).values("gelu_epilogue") == (
        False,)
    assert space.build_search_space(gpu, tiny_workload, evidence=lambda rule: None).values("gelu_epilogue") == (
        False, True)
    int8 = space.build_search_space(gpu, tiny_workload, evidence=lambda rule: None,
                                    placement={"weight_storage": "int8_weight_only"})
    assert int8.values("gelu_epilogue") == (False,)

    class Trial:  # answers as an Optuna trial would, with the last value offered; records what it was asked
        asked: list = []

        def suggest_categorical(self, name, values):
            self.asked.append(name)
            return values[-1]

    offer = levers.Offer({"gelu_epilogue": (False, True)})
    context = None
    assert levers.GELU_EPILOGUE.sample(Trial(), offer, {"quantization": "fp8_rowwise"}, context) == {
        "gelu_epilogue": False}
    assert levers.GELU_EPILOGUE.sample(Trial(), offer, {"quantization": "none"}, context) == {"gelu_epilogue": True}
    assert Trial.asked == ["gelu_epilogue"]  # not asked where FP8 rules it out
