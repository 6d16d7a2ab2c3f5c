"""What a compile cost, from torch's own counters: how many graphs dynamo captured (one block of a regional
compile should be one graph; one per block means each block recompiled), how often inductor's FX graph cache
answered, and the seconds dynamo, AOTAutograd and inductor each spent.

`before = snapshot()` ... `since(before)` gives the difference; both are cheap and never import torch's
compiler themselves (before anything was compiled there is nothing to count).
"""

from __future__ import annotations

import sys
from typing import Any

# torch._dynamo.utils.compilation_time_metrics keys -> our names. Nested: `compile` includes the other three.
PHASES = {
    "_compile.compile_inner": "compile_s",          # dynamo's whole compile of a frame, backend included
    "bytecode_tracing": "trace_s",                  # dynamo running the Python code symbolically
    "create_aot_dispatcher_function": "aot_s",      # AOTAutograd, inductor included
    "compile_fx_inner": "inductor_s",               # inductor: lowering, code generation, kernel compiles
}
COUNTERS = {("stats", "unique_graphs"): "graphs", ("frames", "total"): "frames",
            ("inductor", "fxgraph_cache_hit"): "fx_cache_hits", ("inductor", "fxgraph_cache_miss"): "fx_cache_misses",
            ("inductor", "fxgraph_cache_bypass"): "fx_cache_bypasses"}


def _counts(utils) -> dict[str, int]:
    counters = getattr(utils, "counters", {})
    return {name: int(counters.get(group, {}).get(key, 0)) for (group, key), name in COUNTERS.items()}


def _durations(utils) -> dict[str, list]:
    metrics = getattr(utils, "compilation_time_metrics", {})
    return {name: metrics.get(key) for key, name in PHASES.items()}


def snapshot() -> dict[str, Any]:
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return {}
    # Each list of seconds itself and its length: torch._dynamo.reset() (the tuner's pool calls it) empties
    # the dict of seconds and starts new lists, but leaves the counters growing.
    return {**_counts(utils),
            **{name: (durations, len(durations or ())) for name, durations in _durations(utils).items()}}


def since(before: dict[str, Any]) -> dict[str, Any]:
    """The difference from `before`: counts as ints, seconds rounded; empty where nothing was compiled."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return {}
    delta: dict[str, Any] = {}
    for name, now in _counts(utils).items():
        earlier = before.get(name, 0)
        delta[name] = now - earlier if now >= earlier else now
    for name, durations in _durations(utils).items():
        earlier, count = before.get(name, (None, 0))
        new = (durations or [])[count:] if durations is earlier and durations is not None else (durations or [])
        delta[name] = round(float(sum(new)), 1)
    return delta if any(delta.values()) else {}


def describe(stats: dict[str, Any]) -> str:
    """One line for a progress log: "1 graph, compile 12.3 s (inductor 9.1 s), FX cache 0 hits"."""
    if not stats:
        return "nothing compiled"
    graphs = stats.get("graphs", 0)
    text = f"{graphs} graph{'s' if graphs != 1 else ''} captured, " \
           f"compile {stats.get('compile_s', 0.0):.1f} s (tracing {stats.get('trace_s', 0.0):.1f} s, " \
           f"inductor {stats.get('inductor_s', 0.0):.1f} s)"
    hits, misses = stats.get("fx_cache_hits", 0), stats.get("fx_cache_misses", 0)
    if hits or misses:
        text += f", FX graph cache {hits} hit(s) / {misses} miss(es)"
    return text
