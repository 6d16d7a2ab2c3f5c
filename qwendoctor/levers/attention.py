"""The attention backend: which kernel diffusers' dispatcher runs for joint attention (the lever), and the kernels
diffusers has no local backend for, registered through its dispatcher.

Applied before compile, so the compiled graph traces the chosen kernel. tune offers only the backends this
machine's probes saw work, less those its own timings show cannot win.

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

import dataclasses
from typing import TYPE_CHECKING

from probes.backends import ATTENTION_BACKENDS, BY_NAME, CUDA_ONLY_BACKENDS, REFERENCE_ONLY_BACKENDS
from qwendoctor.errors import EXIT_USAGE, UnavailableLever
from qwendoctor.levers.base import BenchRow, Field, LadderStep, Lever, Offer, SpaceContext, has_transformer

if TYPE_CHECKING:
    from qwendoctor.profile import Profile

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
    register = LOCAL_BACKENDS.get(name)
    if register is not None and not register():
        backend = BY_NAME[name]
        raise RuntimeError(f"attention backend {name!r} needs {backend.package} ({backend.module}), which does not "
                           f"import here: {backend.install}")


# ---- the lever ------------------------------------------------------------------------------------------

# A backend measured (attention_truth, at this workload's shapes) this much slower than the fastest is left
# out: attention is about a third of a W1 step, so 15% slower attention costs about 5% of a step.
ATTENTION_SLACK = 0.15
# The kernels worth a bench row: SDPA's own choices plus the flash-attn and SageAttention packages where they
# import.
FAST_ATTENTION = ("_native_cudnn", "_native_flash", "fa4", "_flash_3", "flash", "sageattn")


def apply_attention_backend(pipe, profile: "Profile"):
    if not has_transformer(pipe, profile, "attention_backend", profile.attention_backend != "native"):
        return pipe
    ensure_backend(profile.attention_backend)  # FA4 is registered with diffusers' dispatcher on first use
    pipe.transformer.set_attention_backend(profile.attention_backend)
    return pipe


def _attention_runnable(profile, workload, capabilities) -> None:
    # Exit 2: a lock or --profile naming a kernel this machine lacks is bad input here, like an unknown value.
    if profile.attention_backend in CUDA_ONLY_BACKENDS and capabilities.device != "cuda":
        raise UnavailableLever(f"attention backend {profile.attention_backend!r} needs a CUDA GPU; this machine runs "
                               "on the CPU", exit_code=EXIT_USAGE)
    working = capabilities.working_attention_backends
    if working is not None and profile.attention_backend not in working:
        backend = BY_NAME[profile.attention_backend]
        needs = f"; it needs {backend.package}: {backend.install}" if backend.install else ""
        raise UnavailableLever(f"attention backend {profile.attention_backend!r} did not pass the check here "
                               f"(working: {', '.join(working)}){needs}", exit_code=EXIT_USAGE)


def _attention_offer(ctx: SpaceContext) -> Offer:
    """Only backends this machine's probes saw work, less those its own timings show cannot win."""
    capabilities = ctx.capabilities
    working = capabilities.working_attention_backends or ("native",)
    # On a GPU, math attention only serves as a numerical reference: it is never the fast choice.
    attention = tuple(b for b in working if not (ctx.on_gpu and b in REFERENCE_ONLY_BACKENDS))
    timed = dict(capabilities.attention_ms or ())
    slow = () if ctx.exhaustive else _slower_than_slack(attention, timed)
    # `native` already runs this backend's kernel (SDPA's own choice): forcing it is the same kernel again.
    same_as_native = capabilities.native_attention if (
        not ctx.exhaustive and capabilities.native_attention in attention and "native" in attention) else None
    left_out = []
    if same_as_native:
        left_out.append(f"attention {same_as_native} (the kernel `native` already runs here, measured by "
                        "attention_truth)")
    if slow:
        # A slow backend is exact: the only 8-bit one is never slower than the fastest of its kind, itself.
        fastest = min((b for b in timed if not (b in BY_NAME and BY_NAME[b].lossy)), key=timed.get)
        left_out.append(f"attention {', '.join(f'{b} ({timed[b] / timed[fastest]:.2f}x)' for b in slow)}"
                        f" (more than {ATTENTION_SLACK:.0%} slower than {fastest} at this workload's shapes, "
                        "measured by attention_truth)")
    kept = tuple(b for b in attention if b not in slow and b != same_as_native)
    return Offer({"attention_backend": kept or ("native",)}, tuple(left_out))


def _slower_than_slack(backends: tuple[str, ...], timed_ms: dict[str, float]) -> tuple[str, ...]:
    """The backends measured more than ATTENTION_SLACK slower than the fastest of their kind; untimed ones stay.
    Of their kind: an 8-bit kernel may miss the quality floor, so it never pushes an exact one out."""
    def fastest(lossy: bool) -> float | None:
        return min((ms for b, ms in timed_ms.items() if b in BY_NAME and BY_NAME[b].lossy == lossy), default=None)

    slow = []
    for b in backends:
        bound = fastest(BY_NAME[b].lossy) if b in BY_NAME else None
        if b != "native" and b in timed_ms and bound is not None and timed_ms[b] > (1 + ATTENTION_SLACK) * bound:
            slow.append(b)
    return tuple(slow)


def _attention_bench(capabilities, workload) -> list[BenchRow]:
    working = capabilities.working_attention_backends or ("native",)
    return [BenchRow(f"attn:{backend}", f"attention {backend}", {"attention_backend": backend})
            for backend in FAST_ATTENTION if backend in working]


ATTENTION = Lever(
    name="attention_backend", apply=apply_attention_backend, undoable=True,
    fields=(Field("attention_backend", str, "native", choices=ATTENTION_BACKENDS),),
    runnable=_attention_runnable, offer=_attention_offer,
    sample=lambda trial, offer, chosen, ctx: {
        "attention_backend": trial.suggest_categorical("attention_backend", offer.values["attention_backend"])},
    describe=lambda p: f"attn={p.attention_backend}",
    lossy=lambda p: BY_NAME[p.attention_backend].lossy,  # 8-bit attention
    bench_alone=_attention_bench,
    # Last, on top of the FP8 tier: 8-bit attention is where that tier's bound lies, and it is lossy too.
    ladder=(LadderStep(10, "stack:+sageattn", "+ 8-bit attention (SageAttention)",
                       lambda p: dataclasses.replace(p, attention_backend="sageattn"),
                       lambda c, w: "sageattn" in (c.working_attention_backends or ())),),
    # A backend from a flash-attn package; SDPA's own kernels come with torch.
    packages=lambda p: ("attention_packages",) if BY_NAME[p.attention_backend].package else (),
)
