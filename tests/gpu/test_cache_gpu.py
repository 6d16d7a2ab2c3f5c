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
                                  Profile(compile="regional", real_rope=True, quantization="fp8_rowwise")],
                         ids=["lossless", "fp8"])
def test_dbcache_stacks_with_regional_compile_and_fp8(tier):
    import dataclasses

    import torch

    torch._dynamo.reset()
    model = models.load_model("synthetic", "cuda", "bfloat16")
    levers.optimize(model.pipe, tier)
    uncached = runner.render(model, WORKLOAD, tier, "a red fox in the snow", 0)
    before = compile_stats.snapshot()
    cached_profile = dataclasses.replace(tier, **CACHED)
    levers.optimize(model.pipe, cached_profile, undoable_only=True)
    image = runner.render(model, WORKLOAD, cached_profile, "a red fox in the snow", 0)
    reused = levers.cached_steps(model.pipe)
    recompiled = compile_stats.since(before)
    fidelity = quality.compare([image], [uncached], with_lpips=False)
    print(f"\n{tier.describe()}: {reused} of {WORKLOAD.reference_steps} steps cached, new graphs {recompiled}, "
          f"PSNR {fidelity['psnr_db']:.1f} dB against uncached")
    assert np.isfinite(image).all() and 0 < reused < WORKLOAD.reference_steps
    assert not (recompiled or {}).get("graphs")  # the cache runs around the compiled blocks, no new graph
    assert fidelity["psnr_db"] > 15
    del model
    torch.cuda.empty_cache()
