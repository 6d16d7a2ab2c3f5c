"""The attention backends qwendoctor knows, in one table: what diffusers' dispatcher calls each, which kernel
attention_truth times for it, where it runs, whether context parallelism can split it, and what provides it.

The dispatcher names, the probes' kernel names and the tuner's mapping between them used to be three tables that
had to agree; every tuple below is derived from this one, so a new backend is one row.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str  # diffusers' dispatcher name: transformer.set_attention_backend(name)
    kernel: str  # attention_truth's name for the kernel it times for this backend
    cuda_only: bool  # no kernel for the CPU (SDPA has no cuDNN or memory-efficient kernel there; FA is GPU code)
    # diffusers registers it with supports_context_parallel=True (diffusers 0.42): Ulysses can split it
    ulysses: bool
    # ring attention also merges partial results with the kernel's log-sum-exp, which plain SDPA does not return
    ring: bool
    description: str
    package: str | None = None  # the pip distribution that provides it; None: torch itself
    module: str | None = None  # the module whose `function` attention_truth calls directly
    function: str = "flash_attn_func"  # called as function(q, k, v, **kwargs) on [B, S, H, D] tensors
    kwargs: tuple[tuple[str, object], ...] = ()
    install: str | None = None  # the command that installs `package`, for the one-line refusal
    # Quantizes q and k (8-bit attention): changes the image beyond rounding, checked against a looser limit.
    lossy: bool = False
    sdpa_backend: str | None = None  # torch.nn.attention.SDPBackend member that restricts SDPA to this kernel
    # The slow exact reference (math materialises S x S scores): checked for correctness, never worth running.
    reference_only: bool = False


BACKENDS: tuple[Backend, ...] = (
    Backend("native", "native", cuda_only=False, ulysses=True, ring=False,
            description="torch SDPA choosing its own kernel (attention_truth reports which); the default"),
    Backend("_native_cudnn", "cudnn", cuda_only=True, ulysses=True, ring=True, sdpa_backend="CUDNN_ATTENTION",
            description="torch SDPA's cuDNN backend, no install"),
    Backend("_native_flash", "flash", cuda_only=False, ulysses=True, ring=True, sdpa_backend="FLASH_ATTENTION",
            description="torch SDPA's built-in FlashAttention-2, no install"),
    Backend("_native_efficient", "efficient", cuda_only=True, ulysses=False, ring=False,
            sdpa_backend="EFFICIENT_ATTENTION", description="torch SDPA's memory-efficient backend, no install"),
    Backend("_native_math", "math", cuda_only=False, ulysses=False, ring=False, sdpa_backend="MATH",
            reference_only=True, description="torch SDPA's math backend, the exact reference"),
    Backend("flash", "fa2", cuda_only=True, ulysses=True, ring=True, package="flash-attn", module="flash_attn",
            install="./install_flash_attention.sh --which fa2", description="the flash-attn package (FA2)"),
    Backend("_flash_3", "fa3", cuda_only=True, ulysses=False, ring=False, package="flash-attn-3",
            module="flash_attn_interface", install="./install_flash_attention.sh --which fa3 --source DIR",
            description="FA3 from flash-attention's hopper/ build (flash_attn_interface)"),
    Backend("fa4", "fa4", cuda_only=True, ulysses=False, ring=False, package="flash-attn-4", module="flash_attn.cute",
            install="./install_flash_attention.sh --which fa4",
            description="flash-attn-4 (./install_flash_attention.sh --which fa4); diffusers has no local FA4 "
                        "backend, so register it first: qwendoctor.levers.attention.register_fa4_backend()"),
    # diffusers' own "sage" backends require sageattention >= 2.1.1, which PyPI does not carry (its newest is
    # 1.0.6); `sageattn` is both versions' entry point (1.x runs Triton kernels, INT8 Q.K and FP16 P.V; diffusers'
    # "sage" backend calls the 2.x one with the same arguments).
    Backend("sageattn", "sage", cuda_only=True, ulysses=False, ring=False, package="sageattention",
            module="sageattention", function="sageattn", kwargs=(("tensor_layout", "NHD"),),
            install="pip install sageattention", lossy=True,
            description="SageAttention's sageattn (pip install sageattention): 8-bit Q.K, lossy; registered "
                        "first: qwendoctor.levers.attention.register_sageattn_backend()"),
    Backend("flex", "flex", cuda_only=False, ulysses=False, ring=False,
            description="torch flex_attention, needs torch.compile"),
)

# The probes' limit for an 8-bit kernel's relative error against a reference (bf16 kernels get their dtype's):
# quantizing q and k puts it far above bf16 rounding, and a broken kernel is off by order 1. Whether the image
# survives a working one is tune's quality floor to judge.
LOSSY_REL_ERR_LIMIT = 1e-1

BY_NAME: dict[str, Backend] = {b.name: b for b in BACKENDS}
BY_KERNEL: dict[str, Backend] = {b.kernel: b for b in BACKENDS}

ATTENTION_BACKENDS: tuple[str, ...] = tuple(b.name for b in BACKENDS)
CUDA_ONLY_BACKENDS: tuple[str, ...] = tuple(b.name for b in BACKENDS if b.cuda_only)
ULYSSES_BACKENDS: tuple[str, ...] = tuple(b.name for b in BACKENDS if b.ulysses)
RING_BACKENDS: tuple[str, ...] = tuple(b.name for b in BACKENDS if b.ring)
REFERENCE_ONLY_BACKENDS: tuple[str, ...] = tuple(b.name for b in BACKENDS if b.reference_only)
# attention_truth's timings keyed by dispatcher backend; the reference is left out: no choice is made from it.
BACKEND_BY_KERNEL: dict[str, str] = {b.kernel: b.name for b in BACKENDS if not b.reference_only}
# The SDPA kernel `native` runs (attention_truth's profiler) -> the backend that forces that same kernel.
BACKEND_BY_NATIVE_PICK: dict[str, str] = {b.kernel: b.name for b in BACKENDS if b.sdpa_backend}
