"""Weight storage: the transformer's weights kept in fewer bits than they compute in (a memory lever).

diffusers' layerwise casting (FP8 storage) or torchao's int8 weight-only quantization; a memory plan chooses it,
tune does not search it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwendoctor.errors import UnavailableLever, UsageError
from qwendoctor.levers.base import Field, Lever, Offer, has_transformer
from qwendoctor.levers.memory import target_device
from qwendoctor.levers.quantization import is_block_linear, keep_quantized_weights_as_they_are

if TYPE_CHECKING:
    from qwendoctor.profile import Profile


# bf16: the weights in the workload's dtype, as diffusers loads them. fp8_storage: diffusers' layerwise casting,
# each layer's weights kept in float8_e4m3fn and cast up to the model's dtype for its own forward: half the weight
# memory, the same matmuls, rounding of the weights to FP8 (lossy). torchao's quantization replaces the same
# weights by FP8 tensors of its own, so the two are never combined.
# int8_weight_only: torchao's int8 weight-only quantization of the blocks' linear layers (per-row scales), the
# activations in the model's dtype: the same memory as FP8 storage without FP8 hardware (Ampere cards), lossy.
# Tested on the CPU only; not measured on a GPU, so the memory plan does not choose it.
WEIGHT_STORAGES = ("bf16", "fp8_storage", "int8_weight_only")


def apply_weight_storage(pipe, profile: "Profile"):
    asked = profile.weight_storage != "bf16"
    if not has_transformer(pipe, profile, "weight_storage", asked) or not asked:
        return pipe
    import torch

    transformer = pipe.transformer
    if profile.weight_storage == "int8_weight_only":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        # set_inductor_config=False: see qwendoctor.levers.quantization.apply_quantization.
        quantize_(transformer.transformer_blocks, Int8WeightOnlyConfig(set_inductor_config=False),
                  filter_fn=is_block_linear)
        keep_quantized_weights_as_they_are(pipe, "weight_storage 'int8_weight_only'", "int8")
    else:
        # The model's skip list (norms, rotary embedding) and diffusers' (the output projection) stay in the
        # model's dtype: the layers where FP8 rounding would cost the most.
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=transformer.dtype)
    # Loaded in host memory (load_on_cpu) so the bf16 weights never occupy the card: they go to it cast. Under
    # offloading the offload lever moves them.
    if profile.offload == "none":
        transformer.to(target_device(pipe))
    return pipe


def _weight_storage_check(profile) -> None:
    if profile.weight_storage != "bf16" and profile.quantization != "none":
        raise UsageError(f"profile.weight_storage: {profile.weight_storage!r} and quantization "
                         f"{profile.quantization!r} both replace the transformer's weights; choose one")
    if profile.weight_storage == "int8_weight_only" and profile.offload != "none":
        raise UsageError(f"profile.weight_storage: 'int8_weight_only' with offload {profile.offload!r} is not "
                         "supported here (torchao's int8 weights are tensor subclasses the offload hooks were not "
                         "tested with); use fp8_storage with offloading")


def _weight_storage_runnable(profile, workload, capabilities) -> None:
    import importlib.util

    if profile.weight_storage == "int8_weight_only" and importlib.util.find_spec("torchao") is None:
        raise UnavailableLever("weight_storage 'int8_weight_only' needs torchao: python -m pip install torchao")


WEIGHT_STORAGE = Lever(
    # Not undoable: the cast drops the weights' low bits, so the pool builds a new transformer.
    name="weight_storage", apply=apply_weight_storage, undoable=False,
    fields=(Field("weight_storage", str, "bf16", choices=WEIGHT_STORAGES, omit_default=True),),
    check=_weight_storage_check, runnable=_weight_storage_runnable,
    packages=lambda p: ("torchao",) if p.weight_storage == "int8_weight_only" else (),
    offer=lambda ctx: Offer({"weight_storage": ("bf16",)}),
    sample=lambda trial, offer, chosen, ctx: {"weight_storage": "bf16"},
    lossy=lambda p: p.weight_storage != "bf16",
    describe=lambda p: {"fp8_storage": "fp8-storage", "int8_weight_only": "int8-storage"}.get(p.weight_storage),
)
