"""Offload: the transformer's blocks or the whole pipeline kept in host memory and brought to the GPU as they
run (a memory lever: a memory plan chooses it, tune does not search it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwendoctor.errors import UnavailableLever, UsageError
from qwendoctor.levers.base import Field, Lever, Offer, has_transformer
from qwendoctor.levers.memory import target_device

if TYPE_CHECKING:
    from qwendoctor.profile import Profile


# group: diffusers' group offloading of the transformer: its blocks live on the CPU and come to the GPU a group
# at a time, the next group copied on a CUDA stream while the current one computes. model: diffusers' model CPU
# offload (accelerate): each component comes to the GPU whole when called and leaves when the next one is.
# sequential: accelerate streams every layer in at its call, the least memory and by far the slowest.
OFFLOADS = ("none", "group", "model", "sequential")
# Blocks per group when the profile leaves it unset: one block's weights on the GPU at a time (plus the next,
# prefetched): the least memory group offloading can hold.
DEFAULT_BLOCKS_PER_GROUP = 1


def apply_offload(pipe, profile: "Profile"):
    if profile.offload == "none":
        return pipe
    import torch

    device = target_device(pipe)
    if profile.offload == "group":
        if not has_transformer(pipe, profile, "offload", True):
            return pipe
        pipe.transformer.enable_group_offload(
            onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
            num_blocks_per_group=profile.offload_blocks_per_group or DEFAULT_BLOCKS_PER_GROUP,
            # A CPU has no copy stream to overlap with; on CUDA the next group arrives while this one computes.
            use_stream=device.type == "cuda")
    elif profile.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    return pipe


def _offload_check(profile) -> None:
    if profile.offload_blocks_per_group is not None and profile.offload != "group":
        raise UsageError("profile.offload_blocks_per_group: set without offload = group")
    if profile.offload == "none":
        return
    if profile.offload == "sequential" and profile.compile != "none":
        raise UsageError(f"profile.offload: 'sequential' moves each layer's weights in at its call, which compile "
                         f"{profile.compile!r} cannot trace; use offload = group or model with compile")
    if profile.parallel != "none":
        # Each rank holds its own pipeline on its own GPU; diffusers' offload hooks and the parallel hooks are not
        # made to work together.
        raise UsageError(f"profile.offload: {profile.offload!r} cannot be combined with parallel "
                         f"{profile.parallel!r}")


def _offload_runnable(profile, workload, capabilities) -> None:
    if profile.offload != "none" and capabilities.device != "cuda":
        raise UnavailableLever(f"offload {profile.offload!r} moves weights between the CPU and a GPU; this machine "
                               "runs on the CPU")


def _describe_offload(p) -> str | None:
    if p.offload == "none":
        return None
    if p.offload == "group":
        return f"offload=group({p.offload_blocks_per_group or DEFAULT_BLOCKS_PER_GROUP})"
    return f"offload={p.offload}"


OFFLOAD = Lever(
    # Not undoable: diffusers has no public way to take group offloading off a model (its weights stay where the
    # hooks last put them); model and sequential offload hooks span the whole pipeline, so it is rebuilt.
    name="offload", apply=apply_offload, undoable=False, pipeline_wide=True,
    fields=(Field("offload", str, "none", choices=OFFLOADS, omit_default=True),
            Field("offload_blocks_per_group", int, None, low=1, optional=True, omit_default=True)),
    check=_offload_check, runnable=_offload_runnable,
    offer=lambda ctx: Offer({"offload": ("none",), "offload_blocks_per_group": (None,)}),
    sample=lambda trial, offer, chosen, ctx: {"offload": "none", "offload_blocks_per_group": None},
    describe=_describe_offload,
)
