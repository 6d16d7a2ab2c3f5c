"""CFG batching with prompts of different lengths: attention per sample, no mask (issue 28)."""

import dataclasses

import numpy as np
import pytest
import torch

from qwendoctor import models, runner
from qwendoctor.levers import cfg_batching
from qwendoctor.profile import Profile


@pytest.fixture
def fresh_tiny():
    return models.load_model("tiny", "cpu", "float32")


def _masked_reference(query, key, value, lengths):
    """SDPA over each row's real tokens, computed with an explicit key mask: what the padding must not change."""
    padded = max(lengths)
    keep = torch.ones(query.shape[0], query.shape[1], dtype=torch.bool)
    for row, length in enumerate(lengths):
        keep[row, length:padded] = False
    out = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=keep[:, None, None, :])
    return out.transpose(1, 2), keep


def test_each_row_attends_without_its_padding_and_without_a_mask(monkeypatch):
    calls = []

    def sdpa(query, key, value, attn_mask=None, **_kwargs):
        calls.append((tuple(query.shape), attn_mask))
        return torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)).transpose(1, 2)

    monkeypatch.setattr(cfg_batching, "_original_dispatch", sdpa)
    monkeypatch.setattr(cfg_batching, "_text_lengths", (5, 3))
    query, key, value = (torch.randn(2, 5 + 16, 4, 8, dtype=torch.float64) for _ in range(3))
    out = cfg_batching._attention_per_sample(query, key, value)
    reference, keep = _masked_reference(query, key, value, (5, 3))
    assert calls == [((1, 21, 4, 8), None), ((1, 19, 4, 8), None)]  # the short row without its 2 padded tokens
    torch.testing.assert_close(out[keep], reference[keep])
    assert torch.equal(out[1, 3:5], torch.zeros(2, 4, 8, dtype=torch.float64))


def test_outside_a_batched_pass_attention_is_diffusers_own(monkeypatch):
    seen = []
    monkeypatch.setattr(cfg_batching, "_original_dispatch", lambda q, k, v, attn_mask=None, **kw: seen.append(q) or q)
    monkeypatch.setattr(cfg_batching, "_text_lengths", None)
    query = torch.randn(2, 7, 1, 4)
    assert cfg_batching._attention_per_sample(query, query, query) is query and len(seen) == 1


def test_batched_image_equals_two_passes_when_the_prompts_differ_in_length(fresh_tiny, tiny_workload):
    workload = dataclasses.replace(tiny_workload, reference_steps=3)
    prompt = "a large red circle at the top left on a blue background"
    positive = fresh_tiny.pipe.encode_prompt(prompt=prompt, device="cpu")[0]
    negative = fresh_tiny.pipe.encode_prompt(prompt=workload.negative_prompt, device="cpu")[0]
    assert positive.shape[1] != negative.shape[1]  # the case the mask used to serve
    two_passes = runner.render(fresh_tiny, workload, Profile(), prompt, 0)
    profile = Profile(cfg_batching=True)
    from qwendoctor import levers

    levers.optimize(fresh_tiny.pipe, profile, workload=workload)
    masks = []
    original = cfg_batching._original_dispatch

    def spy(query, key, value, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    cfg_batching._install_per_sample_attention()
    original, cfg_batching._original_dispatch = cfg_batching._original_dispatch, spy
    try:
        batched = runner.render(fresh_tiny, workload, profile, prompt, 0)
    finally:
        cfg_batching._original_dispatch = original
    assert fresh_tiny.pipe.transformer.batched_calls == 3
    assert masks and all(mask is None for mask in masks)
    np.testing.assert_allclose(batched, two_passes, atol=2e-5)
