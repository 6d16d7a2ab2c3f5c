"""Attention kernels diffusers has no local backend for, registered through its dispatcher.

diffusers 0.42 reaches FA4 only as `flash_4_hub`, which downloads a kernel from the Hub at run time; this
tool is offline. `register_fa4_backend` adds the locally installed `flash_attn.cute` (PyPI `flash-attn-4`)
as the backend "fa4", so `transformer.set_attention_backend("fa4")`, `tune` and the probes treat it like
any other. torch 2.11's own route (`activate_flash_attention_impl("FA4")`) fails with flash-attn-4
4.0.0b36 ("too many values to unpack"), so the function is called directly.

diffusers' SageAttention backends ("sage" and the rest) require sageattention >= 2.1.1, which is not on PyPI
(its newest there is 1.0.6). `register_sageattn_backend` adds "sageattn", which calls the package's `sageattn`,
which 1.x has and which diffusers' "sage" backend calls in 2.x. Both backends are torch custom ops, so regional compile keeps
`fullgraph=True`: dynamo cannot trace the CuTe DSL's JIT or SageAttention's Python around its Triton kernels,
but it keeps an opaque op in its graph.
"""

from __future__ import annotations

FA4 = "fa4"
SAGEATTN = "sageattn"


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


def _fa4_kernel(query, key, value, scale, causal):
    from flash_attn.cute import flash_attn_func

    return flash_attn_func(query, key, value, softmax_scale=scale, causal=causal)


def _sageattn_kernel(query, key, value, scale, causal):
    from sageattention import sageattn

    # [B, S, H, D] is "NHD" in SageAttention's names.
    return sageattn(query, key, value, tensor_layout="NHD", is_causal=causal, sm_scale=scale)


def register_fa4_backend() -> bool:
    """Register FA4 as diffusers backend "fa4"; False (nothing registered) when flash_attn.cute does not import."""
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401  (the import is the check)
    except Exception:  # not installed, a missing CuTe DSL dependency, or an ABI error: the probes say which
        return False
    return _register(FA4, _fa4_kernel)


def register_sageattn_backend() -> bool:
    """Register SageAttention's `sageattn` as diffusers backend "sageattn"; False when the package does not import."""
    try:
        from sageattention import sageattn  # noqa: F401  (the import is the check)
    except Exception:  # not installed, or no triton (a CPU-only torch)
        return False
    return _register(SAGEATTN, _sageattn_kernel)


_OPS: dict = {}


def _register(name: str, kernel) -> bool:
    """`kernel(query, key, value, scale, causal)` on [B, S, H, D] tensors (the dispatcher's layout), registered as
    diffusers backend `name` through a torch custom op."""
    from diffusers.models import attention_dispatch

    member = _add_backend_name(attention_dispatch.AttentionBackendName, name)
    if member in attention_dispatch._AttentionBackendRegistry._backends:
        return True
    op = _custom_op(name, kernel)

    def attention(query, key, value, attn_mask=None, is_causal: bool = False, scale: float | None = None):
        if attn_mask is not None:
            raise ValueError(f"the {name} backend takes no attention mask (diffusers drops Qwen-Image's all-ones "
                             "mask)")
        return op(query, key, value, query.shape[-1] ** -0.5 if scale is None else float(scale), is_causal)

    attention_dispatch._AttentionBackendRegistry.register(member)(attention)
    return True


def _custom_op(name: str, kernel):
    """`kernel` as the torch custom op `qwendoctor::<name>_attention`: torch.compile cannot trace into the CuTe
    DSL's JIT or SageAttention's Python around its Triton kernels, but it keeps an opaque op in its graph, so
    `fullgraph=True` regional compile works with these backends."""
    if name in _OPS:
        return _OPS[name]
    import torch

    # An explicit schema: this module's lazy (string) annotations cannot be resolved from inside a function.
    @torch.library.custom_op(f"qwendoctor::{name}_attention", mutates_args=(),
                             schema="(Tensor query, Tensor key, Tensor value, float scale, bool causal) -> Tensor")
    def attention_op(query, key, value, scale, causal):
        out = kernel(query, key, value, scale, causal)
        return (out[0] if isinstance(out, (tuple, list)) else out).contiguous()  # FA4 returns (out, lse)

    @attention_op.register_fake
    def _(query, key, value, scale, causal):
        return query.new_empty((*query.shape[:-1], value.shape[-1]))

    _OPS[name] = attention_op
    return attention_op


LOCAL_BACKENDS = {FA4: register_fa4_backend, SAGEATTN: register_sageattn_backend}


def ensure_backend(name: str) -> None:
    """Register `name` if it is one of ours; raise if its package does not import here."""
    from probes.backends import BY_NAME

    register = LOCAL_BACKENDS.get(name)
    if register is not None and not register():
        backend = BY_NAME[name]
        raise RuntimeError(f"attention backend {name!r} needs {backend.package} ({backend.module}), which does not "
                           f"import here: {backend.install}")
