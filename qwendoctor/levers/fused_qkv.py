"""Fused q/k/v: Qwen-Image's q/k/v projections as one GEMM per stream.

diffusers' Qwen-Image processor runs six projections in every block: to_q, to_k and to_v on the image stream,
add_q_proj, add_k_proj and add_v_proj on the text stream. Each one reads its stream's activations again and is
its own kernel launch. diffusers' own `Attention.fuse_projections()` concatenates each stream's three weights into
one Linear (`to_qkv`, `to_added_qkv`), but its Qwen-Image processor never reads them. `FusedQwenAttnProcessor` is
that processor with the six projections replaced by the two fused ones and a split. Everything after the split is
diffusers' code path: QK norm, RoPE (looked up in diffusers' module, so the real-RoPE lever still applies), joint
attention through diffusers' dispatcher (so the attention-backend lever still applies), and the output projections.

The unfused Linears are deleted once fused. Kept, they would hold a second copy of the projection weights: 6.8 GB
in bf16 for the 20B transformer (60 blocks x 6 x 3072 x 3072 x 2 bytes). `state_dict()` splits the fused weights
back into diffusers' keys, and `load_state_dict()` accepts those keys, so `save_pretrained` writes a checkpoint
plain diffusers loads.

Applied before quantization and weight storage, so they see the fused Linears, and before compile. It cannot be
undone (the pool replaces the transformer); rounding is all it changes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

from qwendoctor.levers.base import BenchRow, Field, LadderStep, Lever, Offer, fuse_modules

if TYPE_CHECKING:
    from qwendoctor.profile import Profile

# Each fused Linear and the three it replaces, in the order their weights are concatenated.
FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def _module():
    from diffusers.models.transformers import transformer_qwenimage

    return transformer_qwenimage


@functools.cache  # one class: torch.compile guards on the processor's type
def _processor_class():
    qwen = _module()

    class FusedQwenAttnProcessor(qwen.QwenDoubleStreamAttnProcessor2_0):
        """diffusers' QwenDoubleStreamAttnProcessor2_0 reading `to_qkv` and `to_added_qkv`."""

        # The signature is diffusers': Attention.forward passes only the keyword arguments it names.
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                     attention_mask=None, image_rotary_emb=None):
            import torch

            if encoder_hidden_states is None:
                raise ValueError("FusedQwenAttnProcessor requires encoder_hidden_states (text stream)")
            if attention_mask is not None:
                raise ValueError("FusedQwenAttnProcessor does not accept an external attention_mask; pass "
                                 "encoder_hidden_states_mask")
            if encoder_hidden_states_mask is not None:
                image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
                attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
            seq_txt = encoder_hidden_states.shape[1]
            head_dim = attn.inner_dim // attn.heads
            img_query, img_key, img_value = (
                part.unflatten(-1, (-1, head_dim)) for part in attn.to_qkv(hidden_states).chunk(3, dim=-1))
            txt_query, txt_key, txt_value = (
                part.unflatten(-1, (-1, head_dim))
                for part in attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1))
            if attn.norm_q is not None:
                img_query = attn.norm_q(img_query)
            if attn.norm_k is not None:
                img_key = attn.norm_k(img_key)
            if attn.norm_added_q is not None:
                txt_query = attn.norm_added_q(txt_query)
            if attn.norm_added_k is not None:
                txt_key = attn.norm_added_k(txt_key)
            if image_rotary_emb is not None:
                rotate = qwen.apply_rotary_emb_qwen  # at call time: the real-RoPE lever replaces it in the module
                img_freqs, txt_freqs = image_rotary_emb
                img_query = rotate(img_query, img_freqs, use_real=False)
                img_key = rotate(img_key, img_freqs, use_real=False)
                txt_query = rotate(txt_query, txt_freqs, use_real=False)
                txt_key = rotate(txt_key, txt_freqs, use_real=False)
            joint = qwen.dispatch_attention_fn(
                torch.cat([txt_query, img_query], dim=1), torch.cat([txt_key, img_key], dim=1),
                torch.cat([txt_value, img_value], dim=1), attn_mask=attention_mask, dropout_p=0.0,
                is_causal=False, backend=self._attention_backend, parallel_config=self._parallel_config)
            joint = joint.flatten(2, 3).to(img_query.dtype)
            img_out = attn.to_out[0](joint[:, seq_txt:, :].contiguous())
            if len(attn.to_out) > 1:
                img_out = attn.to_out[1](img_out)  # dropout
            return img_out, attn.to_add_out(joint[:, :seq_txt, :].contiguous())

    return FusedQwenAttnProcessor


def _split_on_save(module, state_dict, prefix, _local_metadata) -> None:
    # Copies, not views: safetensors refuses to write tensors that share memory.
    for fused, parts in FUSED.items():
        for kind in ("weight", "bias"):
            whole = state_dict.pop(f"{prefix}{fused}.{kind}", None)
            if whole is not None:
                for name, piece in zip(parts, whole.chunk(len(parts), dim=0)):
                    state_dict[f"{prefix}{name}.{kind}"] = piece.clone()


def _fuse_on_load(_module, state_dict, prefix, *_args) -> None:
    for fused, parts in FUSED.items():
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{name}.{kind}" for name in parts]
            if all(key in state_dict for key in keys):
                import torch

                state_dict[f"{prefix}{fused}.{kind}"] = torch.cat([state_dict.pop(key) for key in keys])


def is_fused(attention) -> bool:
    return getattr(attention, "_qwendoctor_fused", False)


def fuse(transformer) -> int:
    """Fuse every Qwen-Image attention of `transformer` in place (idempotent); returns how many were fused."""
    processor_class = _processor_class()
    fused = 0
    for attention in transformer.modules():
        if is_fused(attention) or not isinstance(getattr(attention, "processor", None),
                                                 _module().QwenDoubleStreamAttnProcessor2_0):
            continue
        attention.fuse_projections()  # diffusers': to_qkv and to_added_qkv from the six weights
        for parts in FUSED.values():
            for name in parts:
                delattr(attention, name)
        old = attention.processor
        processor = processor_class()
        # What the attention-backend and context-parallel levers set on diffusers' processor instance.
        processor._attention_backend = old._attention_backend
        processor._parallel_config = old._parallel_config
        attention.processor = processor
        attention.register_state_dict_post_hook(_split_on_save)
        attention.register_load_state_dict_pre_hook(_fuse_on_load)
        attention._qwendoctor_fused = True
        fused += 1
    return fused


# ---- the lever ------------------------------------------------------------------------------------------

def apply_fused_qkv(pipe, profile: "Profile"):
    return fuse_modules(pipe, profile, "fused_qkv", fuse, is_fused,
                        "Qwen-Image attention (diffusers' QwenDoubleStreamAttnProcessor2_0)")

FUSED_QKV = Lever(
    name="fused_qkv", apply=apply_fused_qkv, undoable=False,
    fields=(Field("fused_qkv", bool, False, omit_default=True),),
    # Searched everywhere: what it saves (four GEMM launches and two reads of each stream per block) is measured,
    # not assumed, and rounding is all it changes.
    offer=lambda ctx: Offer({"fused_qkv": (False, True)}),
    sample=lambda trial, offer, chosen, ctx: {
        "fused_qkv": trial.suggest_categorical("fused_qkv", offer.values["fused_qkv"])
        if len(offer.values["fused_qkv"]) > 1 else offer.values["fused_qkv"][0]},
    describe=lambda p: "fused-qkv" if p.fused_qkv else None,
    bench_alone=lambda c, w: [BenchRow("fused_qkv", "fused q/k/v projections (one GEMM per stream)",
                                       {"fused_qkv": True})],
    ladder=(LadderStep(4, "stack:+fused_qkv", "+ fused q/k/v projections",
                       lambda p: dataclasses.replace(p, fused_qkv=True), lambda c, w: True),),
)
