"""tiny's edit model: its procedural edits, the pixel checker, the shipped weights and the seeded trainer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qwendoctor.tiny import edit_data, shapes


def test_edits_are_seeded_and_the_held_out_split_is_disjoint():
    train, held_out = edit_data.split(0)
    assert (train, held_out) == edit_data.split(0)
    assert not set(train) & set(held_out)
    held_scenes = set(shapes.split(0)[1])
    # no held-out scene is ever an input or an output in training
    assert not {edit.source for edit in train} & held_scenes
    assert not {edit.target for edit in train} & held_scenes
    assert {edit.source for edit in held_out} == held_scenes
    assert edit_data.held_out_edits(0) == edit_data.held_out_edits(0)
    assert set(edit_data.held_out_edits(0)) == set(held_out)
    assert {edit.kind for edit in held_out[:200]} == set(edit_data.KINDS)
    assert edit_data.split(1)[1] != held_out


def test_instructions_round_trip_and_targets_change_one_attribute():
    for edit in edit_data.edits_of(shapes.parse(shapes.EXAMPLE_PROMPT)):
        kind, value, _ = edit_data.parse_instruction(edit.instruction)
        assert (kind, value) == (edit.kind, edit.value)
        changed = [f.name for f in dataclasses.fields(shapes.Scene)
                   if getattr(edit.source, f.name) != getattr(edit.target, f.name)]
        assert changed == [edit.kind]
    with pytest.raises(ValueError):
        edit_data.parse_instruction("make the circle orange")


def test_render_pair_is_seeded():
    edit = edit_data.held_out_edits(0)[0]
    a, b = edit_data.render_pair(edit, [0, 1]), edit_data.render_pair(edit, [0, 1])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("index", range(6))
def test_checker_passes_the_procedural_edit_and_fails_a_copy_and_a_wrong_edit(index):
    edits = edit_data.held_out_edits(0)
    edit = next(e for e in edits[index * 7:] if e.kind == edit_data.KINDS[index % 3])
    source, target = edit_data.render_pair(edit, [index])
    right = edit_data.edit_check(source, edit.target, target, edit.instruction)
    assert right["pass"] and right["made"] and right["kept"] and not right["copied"]
    copied = edit_data.edit_check(source, edit.target.prompt, source, edit.instruction)
    assert not copied["pass"] and copied["copied"]
    # the right change with something else changed too: made, not kept
    other = next(e for e in edit_data.edits_of(edit.target) if e.kind != edit.kind)
    _, both = edit_data.render_pair(other, [index])
    wrong = edit_data.edit_check(source, edit.target, both, edit.instruction)
    assert wrong["made"] and not wrong["kept"] and not wrong["pass"]
    # another edit of the same source instead of the one asked
    instead = next(e for e in edit_data.edits_of(edit.source) if e.kind != edit.kind)
    _, elsewhere = edit_data.render_pair(instead, [index])
    assert not edit_data.edit_check(source, edit.target, elsewhere, edit.instruction)["pass"]


def test_shipped_edit_weights_render_a_finite_128px_edit():
    import torch
    from PIL import Image

    from qwendoctor.tiny.edit import QwenImageEditPipelineTiny, load_tiny_edit_pipeline, shipped_dir

    total = sum(path.stat().st_size for path in shipped_dir().iterdir() if path.is_file())
    assert total < 3_000_000
    pipe = load_tiny_edit_pipeline("cpu", "float32")
    assert isinstance(pipe, QwenImageEditPipelineTiny)
    edit = edit_data.held_out_edits(0)[0]
    source, _ = edit_data.render_pair(edit, [0])
    image = pipe(image=Image.fromarray(source), prompt=edit.instruction, negative_prompt=" ", true_cfg_scale=4.0,
                 num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()


def test_training_is_byte_identical_across_runs(tmp_path):
    import torch
    from safetensors.torch import load_file

    from qwendoctor.tiny import edit_train, trained

    # the shipped recipe's defaults (copy heads, shape-weighted loss, probes), with a large learning rate so two
    # steps move the weights past fp16's resolution: the check must see training
    args = ["--seed", "0", "--pool", "8", "--steps", "2", "--batch", "4", "--lr", "1.0", "--eval-edits", "0"]
    edit_train.main([*args, "--out", str(tmp_path / "a")])
    edit_train.main([*args, "--out", str(tmp_path / "b")])
    first = (tmp_path / "a" / "transformer.safetensors").read_bytes()
    assert first == (tmp_path / "b" / "transformer.safetensors").read_bytes()
    base = load_file(str(trained.shipped_dir() / "transformer.safetensors"))
    stepped = load_file(str(tmp_path / "a" / "transformer.safetensors"))
    assert base.keys() == stepped.keys()
    assert any(not torch.equal(base[name], stepped[name]) for name in base)
    assert all(torch.isfinite(tensor).all() for tensor in stepped.values())


def test_copy_heads_route_each_target_token_to_the_input_token_at_its_place():
    import torch
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    from qwendoctor.tiny.edit import base_components
    from qwendoctor.tiny.edit_train import init_copy_heads

    transformer = base_components()[0]["transformer"]
    init_copy_heads(transformer, 1)
    attn = transformer.transformer_blocks[0].attn
    with torch.no_grad():
        attn.norm_q.weight.mul_(2.5)  # as edit_train's default --qk-gain-init does
        attn.norm_k.weight.mul_(2.5)
        image = torch.randn(1, 128, transformer.inner_dim, generator=torch.Generator().manual_seed(0))
        text = torch.randn(1, 7, transformer.inner_dim, generator=torch.Generator().manual_seed(1))
        image_freqs, text_freqs = transformer.pos_embed([[(1, 8, 8), (1, 8, 8)]], device="cpu", max_txt_seq_len=7)
        head = slice(attn.inner_dim - 16, attn.inner_dim)  # the last head

        def rotated(projection, norm, states, freqs):
            return apply_rotary_emb_qwen(norm(projection(states).unflatten(-1, (-1, 16))), freqs,
                                         use_real=False)[0, :, -1]

        query = rotated(attn.to_q, attn.norm_q, image, image_freqs)
        keys = torch.cat([rotated(attn.add_k_proj, attn.norm_added_k, text, text_freqs),
                          rotated(attn.to_k, attn.norm_k, image, image_freqs)])
        weights = (query @ keys.T / 4).softmax(-1)
    # whatever the content: each of the target's 64 tokens looks most at the input's token at its place
    assert torch.equal(weights[:64].argmax(-1), torch.arange(64) + 7 + 64)
    assert weights[:64, 7 + 64:].diagonal().mean() > 0.5
    assert weights[:, :7].sum(-1).max() < 1e-3  # and not at the text
    assert not attn.to_out[0].weight[:, head].any()  # its output starts at zero


def test_flow_loss_weight_lifts_a_small_shape_to_a_large_ones_mass_within_the_cap():
    import torch

    from qwendoctor.tiny.edit_train import flow_loss_weight

    shape = torch.zeros(3, 64)
    shape[0, :8] = 1.0     # a large shape: 8 tokens
    shape[1, :2] = 0.5     # a small one: 1 token's worth
    shape[2, 0] = 0.05     # a sliver: the cap binds
    plain = flow_loss_weight(shape, 5.0)
    assert torch.equal(plain, 1 + 5.0 * shape)
    lifted = flow_loss_weight(shape, 5.0, small_shape_tokens=4.0, max_boost=4.0)
    assert torch.equal(lifted[0], plain[0])                        # at or above 4 tokens: unchanged
    assert torch.allclose((lifted[1] - 1).sum(), torch.tensor(5.0 * 4.0 * 1.0))  # 1 token's worth x4 = 4 tokens
    assert torch.allclose((lifted[2] - 1).sum(), torch.tensor(5.0 * 0.05 * 4.0))  # capped at 4x, not 80x
    assert torch.equal(lifted[1, 2:], torch.ones(62))  # where no shape is, no extra weight
