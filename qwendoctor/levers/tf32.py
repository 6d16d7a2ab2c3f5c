"""TF32: fp32 matmuls on TensorFloat-32 tensor cores, a process-wide torch setting.

First in the table, so everything applied after it sees it. Qwen-Image runs in bf16, whose matmuls the flag does
not touch: it matters for float32 pipelines and parts, and tune searches it only there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwendoctor.errors import UnavailableLever
from qwendoctor.levers.base import Field, Lever, Offer, SpaceContext

if TYPE_CHECKING:
    from qwendoctor.profile import Profile


def apply_tf32(pipe, profile: "Profile"):
    import torch

    # "high" lets fp32 matmuls use TF32; bf16 matmuls are unaffected, so this matters only for fp32 parts.
    torch.set_float32_matmul_precision("high" if profile.tf32 else "highest")
    return pipe


def _tf32_runnable(profile, workload, capabilities) -> None:
    if profile.tf32 and capabilities.device != "cuda":
        raise UnavailableLever("tf32 is a CUDA matmul mode; it does nothing on the CPU")


def _tf32_offer(ctx: SpaceContext) -> Offer:
    searched = ctx.on_gpu and (ctx.exhaustive or ctx.workload.dtype == "float32")
    left_out = ("TF32 in a bf16 pipeline (its matmuls are bf16: the flag changes nothing they run)",) if (
        ctx.on_gpu and not searched) else ()
    return Offer({"tf32": (False, True) if searched else (False,)}, left_out)


TF32 = Lever(
    name="tf32", apply=apply_tf32, undoable=True,
    fields=(Field("tf32", bool, False),),
    runnable=_tf32_runnable, offer=_tf32_offer,
    sample=lambda trial, offer, chosen, ctx: {"tf32": trial.suggest_categorical("tf32", offer.values["tf32"])},
    describe=lambda p: "tf32" if p.tf32 else None,
)
