"""cache-dit's block cache on the full-size synthetic transformer, stacked with regional compile and FP8: it runs,
reuses blocks, compiles one graph, and keeps the image close to the uncached one (numerically: random weights)."""

import numpy as np
import pytest

from qwendoctor import compile_stats, levers, models, quality, runner
from qwendoctor.profile import Profile, Workload

pytest.importorskip("cache_dit")
WORKLOAD = Workload(model="synthetic", width=512, height=512, reference_steps=10, dtype="bfloat16")
CACHED = {"cache": "dbcache", "cache_threshold": 1.0, "cache_warmup": 3}  # everything after 3 steps may be reused


@pytest.mark.parametrize("tier", [Profile(compile="regional", real_rope=True),
                                  Profile(compile="regional", real_rope=True, quantization="fp8_rowwise"),
                                  Profile(compile="regional", real_rope=True, quantization="fp8_rowwise",
                                          cfg_batching=True)],
                         ids=["lossless", "fp8", "fp8-cfg-batching"])
def test_dbcache_stacks_with_regional_compile_and_fp8(tier):
    import dataclasses

    import torch

    torch._dynamo.reset()
    model = models.load_model("synthetic", "cuda", "bfloat16")
    levers.optimize(model.pipe, tier, workload=WORKLOAD)
    uncached = runner.render(model, WORKLOAD, tier, "a red fox in the snow", 0)
    before = compile_stats.snapshot()
    cached_profile = dataclasses.replace(tier, **CACHED)
    levers.optimize(model.pipe, cached_profile, undoable_only=True, workload=WORKLOAD)
    image = runner.render(model, WORKLOAD, cached_profile, "a red fox in the snow", 0)
    reused = levers.cached_steps(model.pipe)
    recompiled = compile_stats.since(before)
    fidelity = quality.compare([image], [uncached], with_lpips=False)
    print(f"\n{tier.describe()}: {reused} of {WORKLOAD.reference_steps} steps cached, new graphs {recompiled}, "
          f"PSNR {fidelity['psnr_db']:.1f} dB against uncached")
    assert np.isfinite(image).all() and 0 < reused < WORKLOAD.reference_steps
    assert not (recompiled or {}).get("graphs")  # the cache runs around the compiled blocks, no new graph
    assert fidelity["psnr_db"] > 15
    if tier.cfg_batching:  # one batch-2 call a step, wrapped around the hooked transformer
        assert model.pipe.transformer.batched_calls > 0
    levers.optimize(model.pipe, Profile(), undoable_only=True)  # cache-dit's hooks off: they hold the transformer
    del model
    torch.cuda.empty_cache()


def test_a_fixed_cache_schedule_reuses_exactly_its_share_under_compile():
    """What tune measures on synthetic instead of searching caches: 70% of the steps reused, no new graph."""
    import torch

    torch._dynamo.reset()
    model = models.load_model("synthetic", "cuda", "bfloat16")
    tier = Profile(compile="regional", real_rope=True)
    levers.optimize(model.pipe, tier, workload=WORKLOAD)
    runner.render(model, WORKLOAD, tier, "a red fox in the snow", 0)
    before = compile_stats.snapshot()
    fixed = Profile(compile="regional", real_rope=True, cache="dbcache", cache_schedule=0.7, cache_warmup=2)
    levers.optimize(model.pipe, fixed, undoable_only=True, workload=WORKLOAD)
    image = runner.render(model, WORKLOAD, fixed, "a red fox in the snow", 0)
    assert np.isfinite(image).all() and levers.cached_steps(model.pipe) == 7
    assert not (compile_stats.since(before) or {}).get("graphs")
    levers.optimize(model.pipe, Profile(), undoable_only=True)  # cache-dit's hooks off: they hold the transformer
    del model
    torch.cuda.empty_cache()
