"""Qwen-Image's rotary embedding in real arithmetic.

diffusers applies it as a complex multiply (`view_as_complex(x) * freqs`, freqs complex). Inductor does not
generate code for complex operators, so under torch.compile those ops stay separate eager kernels between
the projections and attention, four times per block. The same rotation written with the real and imaginary
parts of the frequencies (x0 cos - x1 sin, x0 sin + x1 cos, in float32 as diffusers does) is plain
elementwise math that inductor fuses into its neighbours. Only the complex path is replaced; a caller that
passes real (cos, sin) tables gets diffusers' own code.
"""

from __future__ import annotations

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
