"""env: environment variables that silently slow or break a run. Pure Python: reads only ctx.env."""

from __future__ import annotations

from probes.context import ProbeContext
from probes.finding import Finding

# name -> why it matters when it is active (None: reported, never flagged)
WATCHED = {
    "CUDA_LAUNCH_BLOCKING": "serializes every kernel launch (a debugging switch: every step waits on the GPU)",
    "TORCH_COMPILE_DISABLE": "torch.compile silently does nothing (the compile levers give no speedup)",
    "TORCHDYNAMO_DISABLE": "torch.compile silently does nothing (the compile levers give no speedup)",
    "DIFFUSERS_ATTN_BACKEND": "overrides the attention backend for every diffusers model, the tuned one included",
    "TORCH_LOGS": "torch debug logging slows compilation and floods the output",
    "TORCH_COMPILE_DEBUG": "writes debug traces for every compile: much slower compiles, large files",
    "CUDA_VISIBLE_DEVICES": "no GPU is visible to CUDA",
    "PYTORCH_CUDA_ALLOC_CONF": None,
    "PYTORCH_ALLOC_CONF": None,
    "HF_HUB_OFFLINE": None,
    "TRANSFORMERS_OFFLINE": None,
    "NVIDIA_TF32_OVERRIDE": None,
    "TORCHINDUCTOR_CACHE_DIR": None,
}
NOTES = {
    "PYTORCH_CUDA_ALLOC_CONF": "CUDA caching allocator settings",
    "PYTORCH_ALLOC_CONF": "allocator settings (torch >= 2.9 name)",
    "HF_HUB_OFFLINE": "Hugging Face hub offline mode (qwendoctor never downloads unless asked)",
    "TRANSFORMERS_OFFLINE": "transformers offline mode",
    "NVIDIA_TF32_OVERRIDE": "0 turns TF32 off in cuBLAS/cuDNN whatever torch's flags say (bf16 is unaffected)",
    "TORCHINDUCTOR_CACHE_DIR": "where compiled kernels are cached",
}


def _flagged(name: str, value: str) -> bool:
    if name == "CUDA_LAUNCH_BLOCKING":
        return value.strip() not in ("", "0")
    if name in ("TORCH_COMPILE_DISABLE", "TORCHDYNAMO_DISABLE", "TORCH_COMPILE_DEBUG"):
        return value.strip() == "1"  # torch's own test
    if name == "DIFFUSERS_ATTN_BACKEND":
        return value.strip() != "native"
    if name == "TORCH_LOGS":
        return value.strip() != ""
    if name == "CUDA_VISIBLE_DEVICES":
        return value.strip() in ("", "-1") or value.strip().startswith("-1,")
    return False


def probe(ctx: ProbeContext) -> Finding:
    measured = {name: ctx.env[name] for name in WATCHED if name in ctx.env}
    flagged, details = [], []
    for name, value in measured.items():
        if _flagged(name, value):
            why = WATCHED[name]
            if name == "DIFFUSERS_ATTN_BACKEND":
                why = f"{value!r} {why}"
            flagged.append(name)
            details.append(f"{name}={value!r}: {why}")
        else:
            details.append(f"{name}={value!r}" + (f" ({NOTES[name]})" if name in NOTES else ""))
    if not measured:
        details.append("none of the watched variables is set: " + ", ".join(WATCHED))
    if not flagged:
        return Finding(id="env", status="ok", summary="no environment variable slows or breaks the run"
                       + (f" ({len(measured)} relevant set, see details)" if measured else ""),
                       details=details, measured=measured)
    summary = "; ".join(f"{n}={measured[n]!r}: {WATCHED[n].split(' (')[0].split(':')[0]}" for n in flagged)
    if len(summary) > 300:
        summary = summary[:297] + "..."
    return Finding(id="env", status="warn", summary=summary, details=details, measured=measured,
                   fix=f"unset {' '.join(flagged)}")
