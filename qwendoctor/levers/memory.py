"""What the memory levers (weight storage, offload, text encoder placement, VAE decode) share: where a pipeline's
components live, and the memory plan that chooses these levers for a card.

`--memory-limit GIB`: the GPU memory this process may use, so that a plan for a 24, 32 or 48 GB card is tuned
and tested on a larger one, and a user can leave room for another process.

The limit is torch's own cap (`torch.cuda.set_per_process_memory_fraction`): an allocation past it raises
torch.OutOfMemoryError as a full card would. It is part of the workload, so a lock records the limit it was tuned
under and `generate` applies it again. The placement levers themselves live in their own modules
(weight_storage, offload, text_encoder, vae_decode); they are never searched by tune.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from qwendoctor.errors import UsageError

if TYPE_CHECKING:
    from qwendoctor.profile import Profile

GIB = 2**30
OPTION = "--memory-limit"


def check_value(limit_gib: float | None) -> None:
    """A limit that cannot be one, refused before anything is imported."""
    if limit_gib is None:
        return
    if isinstance(limit_gib, bool) or not isinstance(limit_gib, (int, float)) or not math.isfinite(limit_gib) \
            or limit_gib <= 0:
        raise UsageError(f"{OPTION} must be a positive number of GiB, got {limit_gib}")


def card_total_gib() -> float | None:
    """GPU 0's memory as NVML reports it (no torch import: answered in well under a second), None without a GPU."""
    import os

    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: no GPU
        return None
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
        first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "").split(",")[0].strip()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(first) if first.isdigit() else 0)
        return pynvml.nvmlDeviceGetMemoryInfo(handle).total / GIB
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def check_against_card(limit_gib: float | None, total_gib: float | None) -> None:
    """A limit for a card this machine does not have, or above the one it has: one line, before loading."""
    check_value(limit_gib)
    if limit_gib is None:
        return
    if total_gib is None:
        raise UsageError(f"{OPTION} {limit_gib:g}: caps GPU memory, and there is no NVIDIA GPU here")
    if limit_gib > total_gib:
        raise UsageError(f"{OPTION} {limit_gib:g}: more than this GPU's {total_gib:.1f} GiB")


def apply(limit_gib: float | None) -> float | None:
    """Cap this process's allocations on cuda:0 at `limit_gib`; returns the fraction of the card it set."""
    if limit_gib is None:
        return None
    import torch

    check_value(limit_gib)
    if not torch.cuda.is_available():
        raise UsageError(f"{OPTION} {limit_gib:g}: caps GPU memory, and CUDA is not available here")
    total_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    check_against_card(limit_gib, total_gib)
    fraction = limit_gib / total_gib
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    return fraction


def placement_for(workload, device: str, total_gib: float | None = None) -> dict:
    """The memory levers' Profile fields for this workload on this GPU (probes.memory_plan: the fastest measured
    placement that fits `--memory-limit`, or the card); {} where everything stays resident or there is no plan (the
    CPU, the toy `tiny`). No placement fitting is refused here, in one line, before any weights load."""
    from probes import memory_plan

    if device != "cuda" or not memory_plan.applies_to(workload.model):
        return {}
    limit = workload.memory_limit_gib
    memory_gib = limit if limit is not None else (total_gib if total_gib is not None else card_total_gib())
    if memory_gib is None:
        return {}
    why = f"{OPTION} {limit:g}" if limit is not None else f"this GPU's {memory_gib:.1f} GiB"
    refused = memory_plan.refusal(workload, memory_gib, why)
    if refused is not None:
        raise UsageError(refused)
    return dict(memory_plan.choose(workload, memory_gib).profile)


def check_placement(profile, workload) -> None:
    """A lock's placement that needs more than `--memory-limit` allows, refused before loading with what it needs."""
    from probes import memory_plan

    limit = workload.memory_limit_gib
    if limit is None or not memory_plan.applies_to(workload.model):
        return
    # The memory levers' fields away from their defaults (a Profile leaves those out of its dict).
    placed = {field: value for field, value in profile.to_dict().items() if field in PLACEMENT_FIELDS}
    placement = memory_plan.Placement("lock", placed, profile.describe())
    need = memory_plan.need_gib(placement, workload)
    if need > memory_plan.usable_gib(limit):
        raise UsageError(f"{OPTION} {limit:g}: the lock's placement ({placement.text}) needs about {need:.1f} GiB "
                         f"at {workload.width}x{workload.height}; tune again with {OPTION} {limit:g}")


PLACEMENT_FIELDS = ("text_encoder", "vae_decode", "weight_storage", "offload", "offload_blocks_per_group")


def describe_placement(workload, placement: dict) -> str:
    """The plan's line for tune's log and bench's notes: the placement, its estimate and measured peak, and the
    memory it was chosen for."""
    from probes import memory_plan

    known = next((p for p in memory_plan.PLACEMENTS if dict(p.profile) == placement), None)
    shown = memory_plan.shown(known, workload) if known is not None else ", ".join(
        f"{field}={value}" for field, value in placement.items())
    limit = workload.memory_limit_gib
    where = f"{OPTION} {limit:g}" if limit is not None else "this GPU"
    return f"{shown}, for {where} (the default and every other profile run in it)"


def target_device(pipe):
    """Where the pipeline runs: the loader's device (models.load_model records it), else the first CUDA device a
    component's weights are on, else diffusers' execution device. A placement lever may find its component in
    host memory (load_on_cpu) and must still know where it is to run."""
    import torch

    recorded = getattr(pipe, "_qwendoctor_device", None)
    if recorded is not None:
        return torch.device(recorded)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            parameter = next(component.parameters(), None)
            if parameter is not None and parameter.device.type == "cuda":
                return parameter.device
    return pipe._execution_device


def load_on_cpu(profile: "Profile") -> frozenset[str]:
    """The components a profile's placement keeps in host memory at load (models.load_model's `on_cpu`): those
    it offloads, and a transformer whose weights go to 8 bits before they reach the GPU. A card that can only
    hold the placed pipeline must never receive the whole one."""
    if profile.offload in ("model", "sequential"):
        return frozenset({"transformer", "text_encoder", "vae"})
    on_cpu = set()
    if profile.offload == "group" or profile.weight_storage != "bf16":
        on_cpu.add("transformer")
    if profile.text_encoder != "resident":
        on_cpu.add("text_encoder")
    return frozenset(on_cpu)
