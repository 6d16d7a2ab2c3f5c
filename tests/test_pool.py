"""The model pool: weights loaded once per study, compile kept while its knobs stay, a transformer with the
original weights whenever a baked-in lever has to go."""

import numpy as np
import pytest
import torch

from qwendoctor import levers, models, pool, runner
from qwendoctor.profile import Capabilities, Profile

CPU = Capabilities(device="cpu", working_attention_backends=("native", "_native_math"))


def _blocks_compiled(transformer) -> bool:
    return all(block._compiled_call_impl is not None for block in transformer.transformer_blocks)


def _same_weights(a, b) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.fixture
def tiny_pool(tiny_workload):
    loads = []

    def load(*args, **kwargs):
        loads.append(args)
        return models.load_model(*args)

    return pool.ModelPool(tiny_workload, CPU, load=load), loads


def test_baked_part_is_what_cannot_be_undone():
    assert levers.baked_part(Profile()) is None
    assert levers.baked_part(Profile(cfg_batching=True, attention_backend="_native_math", steps=3)) is None
    assert levers.baked_part(Profile(quantization="fp8_rowwise", cfg_batching=True)) == {
        "quantization": "fp8_rowwise", "quantization_bf16_blocks": 0, "quantization_text_stream": "fp8_weight_only"}
    # the text stream's choice is baked in too: a transformer with it in bf16 is another transformer
    assert levers.baked_part(Profile(quantization="fp8_rowwise", quantization_text_stream="bf16")) != \
        levers.baked_part(Profile(quantization="fp8_rowwise"))
    # A compiled graph traced every lever: only the step count may change under it.
    compiled = Profile(compile="regional", cfg_batching=True)
    assert levers.baked_part(compiled) == levers.baked_part(Profile(compile="regional", cfg_batching=True, steps=3))
    assert levers.baked_part(compiled) != levers.baked_part(Profile(compile="regional"))


def test_pool_loads_once_reuses_compile_and_restores_the_original_weights(tiny_pool, tiny_workload):
    the_pool, loads = tiny_pool
    first = the_pool.prepare(Profile())
    assert first.how == "loaded" and len(loads) == 1
    original = models.pristine_transformer_source(first.model)()  # a copy to compare weights with
    transformer = first.model.pipe.transformer

    assert the_pool.prepare(Profile(cfg_batching=True)).how == "re-applied"
    compiled = the_pool.prepare(Profile(compile="regional"))
    # Compile is lazy (it runs at the first call), so preparing a compiled profile costs nothing here.
    assert compiled.how == "re-applied" and compiled.model.pipe.transformer is transformer
    assert _blocks_compiled(transformer)

    again = the_pool.prepare(Profile(compile="regional", steps=3))
    assert again.how == "reused" and again.model.pipe.transformer is transformer

    other_graph = the_pool.prepare(Profile(compile="regional", attention_backend="_native_math"))
    assert other_graph.how == "replaced"
    replacement = other_graph.model.pipe.transformer
    assert replacement is not transformer and _blocks_compiled(replacement)
    assert _same_weights(replacement, original)

    eager = the_pool.prepare(Profile())
    assert eager.how == "replaced" and not _blocks_compiled(eager.model.pipe.transformer)
    assert the_pool.replaced == 2 and len(loads) == 1  # the pipeline itself was never loaded again

    the_pool.forget()  # a trial failed half-way: the next one must not trust the transformer
    assert the_pool.prepare(Profile()).how == "replaced"


def test_a_replaced_transformer_renders_the_same_image(tiny_pool, tiny_workload):
    the_pool, _ = tiny_pool
    model = the_pool.prepare(Profile()).model
    before = runner.render(model, tiny_workload, Profile(), "a red fox in the snow", 0)
    the_pool.prepare(Profile(compile="regional"))
    model = the_pool.prepare(Profile()).model  # replaced: rotary tables and buffers rebuilt too
    after = runner.render(model, tiny_workload, Profile(), "a red fox in the snow", 0)
    np.testing.assert_array_equal(before, after)


def test_a_lever_that_raises_leaves_the_pool_distrustful(tiny_pool, monkeypatch):
    the_pool, _ = tiny_pool
    the_pool.prepare(Profile())

    def broken(pipe, profile):
        raise RuntimeError("cache hooks exploded")

    monkeypatch.setattr(levers, "LEVERS", (levers.Lever("broken", broken, undoable=True),))
    with pytest.raises(RuntimeError, match="exploded"):
        the_pool.prepare(Profile(cfg_batching=True))
    monkeypatch.undo()
    assert the_pool.baked_into == pool.UNKNOWN
    assert the_pool.prepare(Profile()).how == "replaced"


def test_time_steps_times_each_step_after_a_warm_up(tiny_model, tiny_workload):
    timing = runner.time_steps(tiny_model, tiny_workload, Profile(), "a red fox in the snow", 0, timed_steps=3)
    assert len(timing.step_s) == 3 and all(s > 0 for s in timing.step_s)
    assert timing.warmup_s > 0 and timing.step_median_s == sorted(timing.step_s)[1]
    assert timing.peak_memory_gib is None  # no allocator to ask on the CPU


def test_fusion_gets_a_new_transformer_both_ways_and_the_unfused_one_has_its_weights(tiny_pool, tiny_workload):
    """Fused q/k/v cannot be taken off a transformer: the pool fuses a pristine one in place, and replaces it when
    a later trial turns fusion off, with diffusers' six projections and the original weights."""
    from qwendoctor.levers import fused_qkv as fused_projections

    the_pool, loads = tiny_pool
    plain = the_pool.prepare(Profile())
    original = models.pristine_transformer_source(plain.model)()
    before = runner.render(plain.model, tiny_workload, Profile(), "a red fox in the snow", 0)
    fused = the_pool.prepare(Profile(fused_qkv=True))
    assert fused.how == "re-applied"  # nothing baked in yet: fused where it stands
    assert any(fused_projections.is_fused(m) for m in fused.model.pipe.transformer.modules())
    assert the_pool.prepare(Profile(fused_qkv=True, cfg_batching=True)).how == "reused"  # fusion stays
    unfused = the_pool.prepare(Profile())
    assert unfused.how == "replaced" and len(loads) == 1
    assert not any(fused_projections.is_fused(m) for m in unfused.model.pipe.transformer.modules())
    assert _same_weights(unfused.model.pipe.transformer, original)
    after = runner.render(unfused.model, tiny_workload, Profile(), "a red fox in the snow", 0)
    np.testing.assert_array_equal(before, after)


def test_closing_the_pool_frees_a_pipeline_that_had_cache_dit_on(tiny_workload):
    """cache-dit patches the pipeline's class with closures over the pipeline: closed without disabling it, the
    pool left the pipeline (on a GPU, its whole resident memory) alive for the multi-GPU stage's rank 0."""
    pytest.importorskip("cache_dit")
    import gc
    import weakref

    drawing = Capabilities(device="cpu", has_cache_dit=True, working_attention_backends=("native",))
    shared = pool.ModelPool(tiny_workload, drawing)
    pipe = shared.prepare(Profile(cache="dbcache", cache_threshold=0.2, cache_warmup=1)).model.pipe
    runner.render(shared.model, tiny_workload, Profile(cache="dbcache", cache_threshold=0.2, cache_warmup=1),
                  "a fox", 0)
    alive = weakref.ref(pipe), weakref.ref(pipe.transformer)
    del pipe
    shared.close()
    gc.collect()
    assert alive[0]() is None and alive[1]() is None
