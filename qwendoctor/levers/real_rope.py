"""Real RoPE: Qwen-Image's rotary embedding in real arithmetic.

diffusers applies it as a complex multiply (`view_as_complex(x) * freqs`, freqs complex). Inductor does not
generate code for complex operators, so under torch.compile those ops stay separate eager kernels between
the projections and attention, four times per block. The same rotation written with the real and imaginary
parts of the frequencies (x0 cos - x1 sin, x0 sin + x1 cos, in float32 as diffusers does) is plain
elementwise math that inductor fuses into its neighbours. Only the complex path is replaced; a caller that
passes real (cos, sin) tables gets diffusers' own code. Process-wide, like tf32: diffusers' attention processor
looks the function up in its module. Applied before compile; it only pays under compile, where tune offers it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from qwendoctor.levers.base import Field, LadderStep, Lever, Offer, SpaceContext

if TYPE_CHECKING:
    from qwendoctor.profile import Profile

_ORIGINAL = None


def _module():
    from diffusers.models.transformers import transformer_qwenimage

    return transformer_qwenimage


def apply_rotary_emb_qwen_real(x, freqs_cis, use_real: bool = True, use_real_unbind_dim: int = -1):
    import torch

    if use_real or not torch.is_complex(freqs_cis):
        return _ORIGINAL(x, freqs_cis, use_real=use_real, use_real_unbind_dim=use_real_unbind_dim)
    cos = freqs_cis.real.unsqueeze(1)  # [S, 1, D/2], broadcast over heads
    sin = freqs_cis.imag.unsqueeze(1)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(3).type_as(x)


def enable() -> None:
    global _ORIGINAL
    module = _module()
    if module.apply_rotary_emb_qwen is not apply_rotary_emb_qwen_real:
        _ORIGINAL = module.apply_rotary_emb_qwen
        module.apply_rotary_emb_qwen = apply_rotary_emb_qwen_real


def disable() -> None:
    module = _module()
    if module.apply_rotary_emb_qwen is apply_rotary_emb_qwen_real:
        module.apply_rotary_emb_qwen = _ORIGINAL


def enabled() -> bool:
    return _module().apply_rotary_emb_qwen is apply_rotary_emb_qwen_real


# ---- the lever ------------------------------------------------------------------------------------------

def apply_real_rope(pipe, profile: "Profile"):
    # Process-wide, like tf32: diffusers' attention processor looks the function up in its module.
    (enable if profile.real_rope else disable)()
    return pipe


def _real_rope_offer(ctx: SpaceContext) -> Offer:
    # Real RoPE only pays under compile (it lets inductor fuse the rotation); eager it is the same math.
    if not ctx.can_compile:
        return Offer({"real_rope": (False,)})
    measured = None if ctx.exhaustive else ctx.evidence("complex-rope")
    if measured:
        return Offer({"real_rope": (True,)}, (f"complex RoPE under compile: {measured}; compiled profiles always "
                                              "use real RoPE",))
    return Offer({"real_rope": (False, True)})


def _real_rope_sample(trial, offer: Offer, chosen: dict[str, Any], ctx: SpaceContext) -> dict[str, Any]:
    values = offer.values["real_rope"]
    if chosen["compile"] == "none":
        return {"real_rope": False}
    return {"real_rope": trial.suggest_categorical("real_rope", values) if len(values) > 1 else values[0]}


REAL_ROPE = Lever(
    name="real_rope", apply=apply_real_rope, undoable=True,
    fields=(Field("real_rope", bool, False),),
    offer=_real_rope_offer, sample=_real_rope_sample,
    describe=lambda p: "real-rope" if p.real_rope else None,
    ladder=(LadderStep(3, "stack:+real_rope", "+ real RoPE (fusable rotary embedding)",
                       lambda p: dataclasses.replace(p, real_rope=True) if p.compile != "none" else p,
                       lambda c, w: c.device == "cuda" and c.compile_works is not False),),
)
