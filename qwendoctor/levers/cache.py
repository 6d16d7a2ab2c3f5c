"""The caches: denoising steps that reuse the transformer blocks' residuals instead of computing them.

One family, one lever: diffusers' FirstBlockCache and cache-dit's DBCache (with TaylorSeer forecasting) share the
`cache` field, its threshold and the rules for combining a cache with compile, CFG batching and parallelism. Lossy:
its quality is judged against the floor, and only on a model that draws.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qwendoctor.errors import UnavailableLever, UsageError
from qwendoctor.levers import cfg_batching
from qwendoctor.levers.base import Field, Lever, Offer, SpaceContext, has_transformer, runs_true_cfg

if TYPE_CHECKING:
    from qwendoctor.profile import Profile


# first_block: diffusers' FirstBlockCache hooks, eager only. dbcache: cache-dit's block cache (compute the first Fn
# and last Bn blocks, reuse the middle's residual while the first blocks' output changes less than the threshold),
# optionally with TaylorSeer forecasting; its decisions run in Python around the blocks, so it composes with
# regional compile and FP8 (measured on an H200: benchmarks/h200/cache-compose), where diffusers' hooks do not.
CACHES = ("none", "first_block", "dbcache")
CACHE_THRESHOLD_RANGE = (0.05, 0.3)  # what the search draws from; a lock may hold any value in (0, 1]
# cache-dit's own defaults for what a dbcache profile leaves unset (DBCacheConfig).
DBCACHE_DEFAULTS = {"cache_fn": 1, "cache_bn": 0, "cache_warmup": 8}
DBCACHE_FIELDS = ("cache_fn", "cache_bn", "cache_warmup", "cache_max_run", "taylorseer_order", "cache_schedule")
TAYLORSEER_ORDERS = (1, 2)
CACHE_DIT_INSTALL = "pip install 'qwendoctor[cache]'"


def apply_cache(pipe, profile: "Profile"):
    if not has_transformer(pipe, profile, "cache", profile.cache != "none"):
        return pipe
    # CFG batching's interception from an earlier profile goes first: the caches are set up on the plain
    # transformer, and CFG batching (later in the order) intercepts the call around whatever they hook.
    cfg_batching.disable(pipe)
    if getattr(pipe.transformer, "is_cache_enabled", False):
        pipe.transformer.disable_cache()
    if getattr(pipe, "_qwendoctor_cache_dit", False):
        import cache_dit

        cache_dit.disable_cache(pipe)
        pipe._qwendoctor_cache_dit = False
    if profile.cache == "first_block":
        from diffusers.hooks import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=profile.cache_threshold))
        _count_first_block_skips(pipe, 2 if separate_cfg_passes(pipe, profile) else 1)
    elif profile.cache == "dbcache":
        _enable_dbcache(pipe, profile)
    return pipe


def _count_first_block_skips(pipe, calls_per_step: int) -> None:
    """Count the transformer calls diffusers' FirstBlockCache skips (its head block's verdict, per call), so a
    cache that skipped nothing is known as one (qwendoctor.verify.drop_inert), as cache-dit's record tells."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    head = pipe.transformer.transformer_blocks[0]
    hook = HookRegistry.check_if_exists_or_initialize(head).get_hook(_FBC_LEADER_BLOCK_HOOK)
    if hook is None:
        return
    decide = hook._should_compute_remaining_blocks
    pipe._qwendoctor_skipped_calls = 0
    pipe._qwendoctor_calls_per_step = calls_per_step

    def counted(residual):
        compute = decide(residual)
        if not compute:
            pipe._qwendoctor_skipped_calls += 1
        return compute

    hook._should_compute_remaining_blocks = counted


def _enable_dbcache(pipe, profile: "Profile") -> None:
    import os

    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # read when cache_dit is first imported
    import cache_dit

    value = {name: getattr(profile, name) for name in DBCACHE_FIELDS}
    always = (value["cache_fn"] or DBCACHE_DEFAULTS["cache_fn"]) + (value["cache_bn"] or 0)
    blocks = len(pipe.transformer.transformer_blocks)
    if always >= blocks:
        raise UsageError(f"profile.cache_fn + cache_bn: {always} blocks always computed leave none of this "
                         f"transformer's {blocks} to reuse")
    warmup = DBCACHE_DEFAULTS["cache_warmup"] if value["cache_warmup"] is None else value["cache_warmup"]
    schedule = {}
    if value["cache_schedule"] is not None:
        workload = getattr(pipe, "_qwendoctor_workload", None)
        if workload is None:
            raise UsageError("profile.cache_schedule: a fixed schedule needs the workload's step count")
        # The steps the call runs: image-to-image skips the schedule's first (1 - strength).
        steps = workload.denoised_steps(profile.steps or workload.reference_steps)
        # cache-dit's static policy: the mask alone decides which steps reuse, whatever the residuals do.
        schedule = {"steps_computation_mask": fixed_schedule(steps, value["cache_schedule"], warmup),
                    "steps_computation_policy": "static", "num_inference_steps": steps}
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=value["cache_fn"] or DBCACHE_DEFAULTS["cache_fn"],
        Bn_compute_blocks=DBCACHE_DEFAULTS["cache_bn"] if value["cache_bn"] is None else value["cache_bn"],
        residual_diff_threshold=profile.cache_threshold or 0.0,
        max_warmup_steps=warmup,
        max_continuous_cached_steps=value["cache_max_run"] or -1,
        **schedule,
        # One cache per CFG pass when the pipeline calls the transformer twice a step; with CFG batching (one
        # batch-2 call) or without CFG each call is a step, and one decision covers the whole batch.
        enable_separate_cfg=separate_cfg_passes(pipe, profile))
    calibrator = (cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=value["taylorseer_order"])
                  if value["taylorseer_order"] else None)
    cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
    pipe._qwendoctor_cache_dit = True
    pipe._qwendoctor_separate_cfg = config.enable_separate_cfg


def separate_cfg_passes(pipe, profile: "Profile") -> bool:
    """Whether each denoising step calls the transformer twice (true CFG, not batched). Under CFG-parallel each
    rank makes one call per step (its own pass): a cache set up for two compared residuals two steps apart."""
    workload = getattr(pipe, "_qwendoctor_workload", None)
    return (runs_true_cfg(workload, profile) and not profile.cfg_batching
            and getattr(profile, "cfg_degree", 1) == 1)


def fixed_schedule(steps: int, cached_fraction: float, warmup: int) -> list[int]:
    """A step mask (1 computes, 0 reuses) caching `cached_fraction` of `steps`: the first `warmup` steps (fewer
    where the fraction leaves fewer computed) and the last are computed, the others spread evenly between them."""
    computed = min(steps, max(2, round(steps * (1 - cached_fraction))))
    warmup = min(warmup, computed - 1)
    spread = computed - warmup - 1
    picks = {warmup + round(i * (steps - 1 - warmup) / max(spread, 1)) for i in range(spread)}
    keep = set(range(min(warmup, steps))) | picks | {steps - 1}
    return [1 if step in keep else 0 for step in range(steps)]


def cached_steps(pipe) -> int | None:
    """Denoising steps the last call reused cached blocks for in both CFG passes (cache-dit's record), or, for
    diffusers' FirstBlockCache, the transformer calls it skipped since the last reading over the calls a step
    makes, rounded up (a step where it skipped one CFG pass of two counts: the image is not the uncached one);
    None without a cache."""
    if getattr(pipe.transformer, "is_cache_enabled", False) and hasattr(pipe, "_qwendoctor_skipped_calls"):
        skipped, pipe._qwendoctor_skipped_calls = pipe._qwendoctor_skipped_calls, 0
        return -(-skipped // pipe._qwendoctor_calls_per_step)
    if not getattr(pipe, "_qwendoctor_cache_dit", False):
        return None
    import cache_dit

    # logging=False: a record, not a report.
    stats = cache_dit.summary(pipe.transformer, logging=False)[0]
    cond = set(getattr(stats, "cached_steps", None) or [])
    if not pipe._qwendoctor_separate_cfg:
        return len(cond)
    return len(cond & set(getattr(stats, "cfg_cached_steps", None) or []))


def _cache_check(profile) -> None:
    if profile.cache != "dbcache":
        for name in DBCACHE_FIELDS:
            if getattr(profile, name) is not None:
                raise UsageError(f"profile.{name}: set without cache = dbcache")
    if profile.cache == "none":
        if profile.cache_threshold is not None:
            raise UsageError("profile.cache_threshold: set without a cache")
        return
    threshold = profile.cache_threshold
    if profile.cache == "dbcache" and profile.cache_schedule is not None:
        fraction = profile.cache_schedule
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction < 1:
            raise UsageError(f"profile.cache_schedule: the fraction of steps cached must be in (0, 1), got "
                             f"{fraction!r}")
        if threshold is not None:
            raise UsageError("profile.cache_threshold: a fixed cache_schedule decides which steps reuse; leave the "
                             "threshold unset")
    elif not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold <= 1:
        raise UsageError(f"profile.cache_threshold: must be in (0, 1] for cache {profile.cache!r}, got {threshold!r}")
    if profile.cache == "first_block" and profile.compile != "none":
        # Its hooks wrap each block's forward, so the compiled block traces into a function diffusers marks
        # torch.compiler.disable(): dynamo refuses it (benchmarks/h200/cache-compose).
        raise UsageError(f"profile: cache 'first_block' cannot be combined with compile {profile.compile!r}; "
                         "cache = dbcache can")
    if profile.cache == "dbcache":
        if profile.compile == "full":
            raise UsageError("profile: cache 'dbcache' runs with compile = regional (measured), not full")
    if profile.context_degree > 1:
        # Each rank would decide to skip blocks from its own shard of the sequence: ranks that decide
        # differently issue different collectives and the run deadlocks.
        raise UsageError(f"profile: cache {profile.cache!r} cannot be combined with parallel {profile.parallel!r}")


def _cache_runnable(profile, workload, capabilities) -> None:
    if profile.cache == "dbcache" and not capabilities.has_cache_dit:
        raise UnavailableLever(f"cache 'dbcache' needs cache-dit: {CACHE_DIT_INSTALL}")


def _cache_offer(ctx: SpaceContext) -> Offer:
    if not ctx.draws:
        return Offer({"cache": ("none",)}, (f"caches: {ctx.workload.model} has random weights, so whether a skipped "
                                            "step hurts the image cannot be judged on it",))
    offered = tuple(c for c in CACHES if c != "dbcache" or ctx.capabilities.has_cache_dit)
    left_out = () if ctx.capabilities.has_cache_dit else (f"cache dbcache: cache-dit is not installed "
                                                          f"({CACHE_DIT_INSTALL})",)
    return Offer({"cache": offered}, left_out)


def _cache_sample(trial, offer: Offer, chosen: dict[str, Any], ctx: SpaceContext) -> dict[str, Any]:
    nothing = {"cache": "none", "cache_threshold": None, **dict.fromkeys(DBCACHE_FIELDS)}
    # diffusers' hooks do not survive compile (_cache_check): under compile only cache-dit's cache is drawn.
    offered = tuple(c for c in offer.values["cache"] if chosen["compile"] == "none" or c != "first_block")
    if chosen["compile"] == "full" or offered == ("none",):
        return nothing
    cache = trial.suggest_categorical("cache" if chosen["compile"] == "none" else "cache_compiled", offered)
    if cache == "none":
        return nothing
    drawn = {**nothing, "cache": cache,
             "cache_threshold": trial.suggest_float("cache_threshold", *CACHE_THRESHOLD_RANGE)}
    if cache == "dbcache":
        # The first Fn and last Bn blocks always run: they must leave blocks to reuse.
        fn_max = min(4, ctx.blocks - 1) if ctx.blocks else 4
        bn_max = min(2, ctx.blocks - 1 - fn_max) if ctx.blocks else 2
        drawn.update(cache_fn=trial.suggest_int("cache_fn", 1, fn_max),
                     cache_bn=trial.suggest_int("cache_bn", 0, bn_max),
                     cache_warmup=_cache_warmup(trial, chosen, ctx),
                     cache_max_run=trial.suggest_categorical("cache_max_run", (None, 2, 3, 5)),
                     taylorseer_order=trial.suggest_categorical("taylorseer_order", (None, *TAYLORSEER_ORDERS)))
    return drawn


def _cache_warmup(trial, chosen: dict[str, Any], ctx: SpaceContext) -> int:
    """A warm-up below the trial's step count (STEPS is drawn before CACHE): cache-dit computes every warm-up
    step, so a warm-up of 8 at 8 steps cached nothing and was the uncached profile bit for bit."""
    steps = ctx.workload.denoised_steps(chosen.get("steps") or ctx.workload.reference_steps)
    high = max(min(8, steps - 1), 0)
    low = min(2, high)
    return trial.suggest_int("cache_warmup", low, low + (high - low) // 2 * 2, step=2)


def _describe_cache(p) -> str | None:
    if p.cache == "none":
        return None
    if p.cache == "first_block":
        return f"first_block({p.cache_threshold:g})"
    when = f"{p.cache_threshold:g}" if p.cache_schedule is None else f"fixed {p.cache_schedule:.0%}"
    parts = [when, f"F{p.cache_fn or DBCACHE_DEFAULTS['cache_fn']}"
             f"B{DBCACHE_DEFAULTS['cache_bn'] if p.cache_bn is None else p.cache_bn}"]
    if p.cache_warmup is not None:
        parts.append(f"warmup {p.cache_warmup}")
    if p.cache_max_run:
        parts.append(f"runs <= {p.cache_max_run}")
    if p.taylorseer_order:
        parts.append(f"taylorseer {p.taylorseer_order}")
    return f"dbcache({', '.join(parts)})"


CACHE = Lever(
    name="cache", apply=apply_cache, undoable=True,
    fields=(Field("cache", str, "none", choices=CACHES), Field("cache_threshold", float, None, optional=True),
            Field("cache_fn", int, None, low=1, optional=True), Field("cache_bn", int, None, low=0, optional=True),
            Field("cache_warmup", int, None, low=0, optional=True),
            Field("cache_max_run", int, None, low=1, optional=True),
            Field("taylorseer_order", int, None, choices=TAYLORSEER_ORDERS, optional=True),
            # this fraction of the steps reused on a fixed schedule instead of a threshold: measures a cache's
            # speed where quality cannot judge it (random weights); never drawn by the search
            Field("cache_schedule", float, None, optional=True, omit_default=True)),
    check=_cache_check, runnable=_cache_runnable, offer=_cache_offer, sample=_cache_sample,
    lossy=lambda p: p.cache != "none", describe=_describe_cache,
    packages=lambda p: ("cache_dit",) if p.cache == "dbcache" else (),
)
