"""Attention kernels diffusers has no local backend for, registered through its dispatcher.

diffusers 0.42 reaches FA4 only as `flash_4_hub`, which downloads a kernel from the Hub at run time; this
tool is offline. `register_fa4_backend` adds the locally installed `flash_attn.cute` (PyPI `flash-attn-4`)
as the backend "fa4", so `transformer.set_attention_backend("fa4")`, `tune` and the probes treat it like
any other. torch 2.11's own route (`activate_flash_attention_impl("FA4")`) fails with flash-attn-4
4.0.0b36 ("too many values to unpack"), so the function is called directly.
"""

from __future__ import annotations

FA4 = "fa4"


def _add_backend_name(names, value: str):
    """A new member of diffusers' closed AttentionBackendName enum, so its dispatcher can key on it."""
    if value in names._value2member_map_:
        return names._value2member_map_[value]
    member = str.__new__(names, value)
    member._name_ = value.upper()
    member._value_ = value
    names._member_map_[member._name_] = member
    names._value2member_map_[value] = member
    names._member_names_.append(member._name_)
    return member


def register_fa4_backend() -> bool:
    """Register FA4 as diffusers backend "fa4"; False (nothing registered) when flash_attn.cute does not import."""
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401  (the import is the check)
    except Exception:  # not installed, a missing CuTe DSL dependency, or an ABI error: the probes say which
        return False
    from diffusers.models import attention_dispatch

    member = _add_backend_name(attention_dispatch.AttentionBackendName, FA4)
    if member in attention_dispatch._AttentionBackendRegistry._backends:
        return True

    kernel = _fa4_custom_op()

    def fa4_attention(query, key, value, attn_mask=None, is_causal: bool = False, scale: float | None = None):
        # query/key/value: [B, S, H, D], the layout both diffusers' dispatcher and FA4 use.
        if attn_mask is not None:
            raise ValueError("the fa4 backend takes no attention mask (diffusers drops Qwen-Image's all-ones mask)")
        return kernel(query, key, value, query.shape[-1] ** -0.5 if scale is None else float(scale), is_causal)

    attention_dispatch._AttentionBackendRegistry.register(member)(fa4_attention)
    return True


_FA4_OP = None


def _fa4_custom_op():
    """FA4 as a torch custom op: torch.compile cannot trace into the CuTe DSL's JIT, but it keeps an opaque op
    in its graph, so `fullgraph=True` regional compile works with the fa4 backend."""
    global _FA4_OP
    if _FA4_OP is not None:
        return _FA4_OP
    import torch

    # An explicit schema: this module's lazy (string) annotations cannot be resolved from inside a function.
    @torch.library.custom_op("qwendoctor::fa4_attention", mutates_args=(),
                             schema="(Tensor query, Tensor key, Tensor value, float scale, bool causal) -> Tensor")
    def fa4_attention_op(query, key, value, scale, causal):
        from flash_attn.cute import flash_attn_func

        out = flash_attn_func(query, key, value, softmax_scale=scale, causal=causal)
        return (out[0] if isinstance(out, (tuple, list)) else out).contiguous()

    @fa4_attention_op.register_fake
    def _(query, key, value, scale, causal):
        return query.new_empty((*query.shape[:-1], value.shape[-1]))

    _FA4_OP = fa4_attention_op
    return _FA4_OP


LOCAL_BACKENDS = {FA4: register_fa4_backend}


def ensure_backend(name: str) -> None:
    """Register `name` if it is one of ours; raise if its package does not import here."""
    register = LOCAL_BACKENDS.get(name)
    if register is not None and not register():
        raise RuntimeError(f"attention backend {name!r} needs flash-attn-4 (flash_attn.cute), which does not "
                           "import here: ./install_flash_attention.sh --which fa4")
