"""What Inductor already fuses in one compiled Qwen-Image block, on the CPU's code generator (the GPU's, Triton,
names its kernels the same way; the H100 bench's compiled steps list `triton_red_fused_add_mul_native_layer_norm_*`
kernels). Two of issue 18's asks rest on these facts, so they are tested rather than assumed:

- adaLN: the modulation (`x * (1 + scale) + shift`) runs in the LayerNorm's kernel; a lever fusing them would
  remove nothing under compile.
- q/k/v concatenation: with fused projections and real RoPE, no kernel is left that only copies q, k or v into
  the joint sequence; the norm-and-rotate kernels write straight into it. Without fused projections one is.
"""

import re

import pytest
import torch

from qwendoctor import levers, models
from qwendoctor.profile import Profile

KERNEL = re.compile(r"^\s*(cpp_fused_\w+) = async_compile", re.MULTILINE)


def _block_kernels(profile: Profile) -> list[str]:
    from torch._inductor.utils import run_and_get_code

    model = models.load_model("tiny", "cpu", "bfloat16")
    levers.optimize(model.pipe, profile)
    block = model.pipe.transformer.transformer_blocks[0]
    captured = {}
    hook = block.register_forward_pre_hook(lambda _m, args, kwargs: captured.update(args=args, kwargs=kwargs),
                                           with_kwargs=True)
    try:
        model.pipe("a red circle", num_inference_steps=2, height=64, width=64, true_cfg_scale=1.0)
        hook.remove()
        torch._dynamo.reset()
        with torch.no_grad():
            _, codes = run_and_get_code(torch.compile(block, fullgraph=True), *captured["args"], **captured["kwargs"])
    finally:
        hook.remove()
        levers.apply_real_rope(model.pipe, Profile())  # process-wide: leave it as the other tests expect
    return KERNEL.findall("\n".join(codes))


@pytest.fixture(scope="module")
def fused_kernels():
    return _block_kernels(Profile(fused_qkv=True, real_rope=True))


def test_the_adaln_modulation_runs_in_the_layer_norms_kernel(fused_kernels):
    norms = [k for k in fused_kernels if "native_layer_norm" in k]
    # norm1 and norm2 of both streams; Inductor puts the two streams' norms in one kernel or in two
    assert len(norms) >= 2, fused_kernels
    assert all("add" in k and "mul" in k for k in norms), norms


def test_fused_projections_with_real_rope_leave_no_concatenation_copy(fused_kernels):
    def copies_only(kernel: str) -> bool:
        ops = set(kernel.removeprefix("cpp_fused_").rstrip("_0123456789").split("_")) - {""}
        return "cat" in ops and ops <= {"cat", "view", "to", "copy", "split", "clone"}

    assert not [k for k in fused_kernels if copies_only(k)], fused_kernels
    assert any("cat" in k and "rsqrt" in k for k in fused_kernels), fused_kernels  # q/k written into the join
    unfused = _block_kernels(Profile(real_rope=True))
    assert [k for k in unfused if copies_only(k)], unfused  # the check can fail: v's copy without fusion
