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


def snapshot() -> dict[str, Any]:
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return {}
    values: dict[str, Any] = {}
    counters = getattr(utils, "counters", {})
    for (group, key), name in COUNTERS.items():
        values[name] = int(counters.get(group, {}).get(key, 0))
    metrics = getattr(utils, "compilation_time_metrics", {})
    for key, name in PHASES.items():
        # The list itself and its length: torch._dynamo.reset() (the tuner's pool calls it) empties the dict
        # of seconds and starts new lists, but leaves the counters growing.
        durations = metrics.get(key)
        values[name] = (durations, len(durations) if durations is not None else 0)
    return values


def since(before: dict[str, Any]) -> dict[str, Any]:
    """The difference from `before`: counts as ints, seconds rounded; empty where nothing was compiled."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return {}
    delta: dict[str, Any] = {}
    counters = getattr(utils, "counters", {})
    for (group, key), name in COUNTERS.items():
        now = int(counters.get(group, {}).get(key, 0))
        earlier = before.get(name, 0)
        delta[name] = now - earlier if now >= earlier else now
    metrics = getattr(utils, "compilation_time_metrics", {})
    for key, name in PHASES.items():
        durations = metrics.get(key) or []
        earlier, count = before.get(name, (None, 0))
        new = durations[count:] if durations is earlier else durations
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
