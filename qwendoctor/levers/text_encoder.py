"""Where the text encoder lives: resident on the GPU, offloaded to host memory between calls, or run on the CPU
(a memory lever: it runs once per call, so moving it costs little; a memory plan chooses it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwendoctor.errors import UnavailableLever, UsageError
from qwendoctor.levers.base import Field, Lever, Offer
from qwendoctor.levers.memory import target_device

if TYPE_CHECKING:
    from qwendoctor.profile import Profile


# resident: on the GPU with the rest, as diffusers builds it. offload: diffusers' group offloading of the text
# encoder; its top level has no block list (Qwen2.5-VL's layers sit one module down), so block-level offloading
# makes it one group: the whole encoder comes to the GPU for its forward and goes back to the CPU after, which
# leaves the denoising loop without it. cpu: it runs on the CPU (accelerate's device hook moves its inputs there
# and its hidden states back), the GPU never holds it.
TEXT_ENCODER_PLACEMENTS = ("resident", "offload", "cpu")


def apply_text_encoder(pipe, profile: "Profile"):
    encoder = getattr(pipe, "text_encoder", None)
    # A pipeline without a text encoder (prompts given as embeddings) has nothing to place; an encoder already
    # placed so (the pool gave its pipeline a new transformer) is left as it is: group offloading cannot be
    # applied twice.
    if (encoder is None or profile.text_encoder == "resident"
            or getattr(encoder, "_qwendoctor_placement", None) == profile.text_encoder):
        return pipe
    import torch

    device = target_device(pipe)
    object.__setattr__(encoder, "_qwendoctor_placement", profile.text_encoder)
    if profile.text_encoder == "offload":
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(encoder, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1,
                               use_stream=device.type == "cuda")
        return pipe
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    encoder.to("cpu")
    add_hook_to_module(encoder, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))
    # diffusers takes the pipeline's execution device from accelerate hooks it finds on components; this one's
    # device is the CPU, which is not where the pipeline runs.
    pipe._exclude_from_cpu_offload = [*pipe._exclude_from_cpu_offload, "text_encoder"]
    return pipe


def _text_encoder_check(profile) -> None:
    if profile.text_encoder != "resident" and profile.offload in ("model", "sequential"):
        raise UsageError(f"profile.text_encoder: {profile.text_encoder!r} with offload {profile.offload!r}, which "
                         "already moves the text encoder; leave text_encoder = resident")


def _text_encoder_runnable(profile, workload, capabilities) -> None:
    if profile.text_encoder != "resident" and capabilities.device != "cuda":
        raise UnavailableLever(f"text_encoder {profile.text_encoder!r} keeps it off a GPU; this machine runs on the "
                               "CPU already")


TEXT_ENCODER = Lever(
    # Not undoable: group offloading has no public removal (see qwendoctor.levers.offload), and the placement is a
    # component's.
    name="text_encoder", apply=apply_text_encoder, undoable=False, pipeline_wide=True,
    fields=(Field("text_encoder", str, "resident", choices=TEXT_ENCODER_PLACEMENTS, omit_default=True),),
    check=_text_encoder_check, runnable=_text_encoder_runnable,
    offer=lambda ctx: Offer({"text_encoder": ("resident",)}),
    sample=lambda trial, offer, chosen, ctx: {"text_encoder": "resident"},
    describe=lambda p: f"te={p.text_encoder}" if p.text_encoder != "resident" else None,
)
