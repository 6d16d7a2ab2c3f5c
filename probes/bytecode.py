"""bytecode: does Python find compiled bytecode (.pyc) for torch and the libraries it imports?

Without it every Python process compiles those sources again before it runs a line of ours: each check worker,
each `generate`, each torchrun rank, each tune worker. Container images often cause it: PYTHONDONTWRITEBYTECODE=1
(a Dockerfile habit) together with `pip install --no-compile`, or a read-only site-packages. On the H100 host of
benchmarks/check/README.md in that state importing torch took 4.07 s instead of 2.15-2.29 s, and torch's compiler
stack 11.66 s instead of 4.59 s (probes/measured.toml, "import_seconds").

The probe imports torch (in `check` its worker already has, along with what the other probes of its group
imported), then looks at every loaded module that came from a .py file: is its .pyc where this Python looks,
and current (magic number, source mtime and size)? The cost is measured: the missing modules' sources are
compiled here, as an import would, for up to COMPILE_BUDGET_S; past that the rest is estimated from the bytes per
second measured.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
import time
from pathlib import Path

from probes import measured
from probes.context import ProbeContext, exc_line
from probes.finding import Finding

COMPILE_BUDGET_S = 1.5
WARN_S = 0.5  # below this a process hardly notices (a few of the user's own modules, say)
_HEADER = 16  # magic (4), flags (4), source mtime (4), source size (4): PEP 552's timestamp-based pyc


def loaded_modules() -> list:
    return list(sys.modules.values())


def bytecode_state(source: Path, cached: str | None) -> str:
    """'current' | 'missing' | 'stale' for the .pyc an import of `source` would read."""
    if not cached:
        return "missing"
    try:
        with open(cached, "rb") as fh:
            header = fh.read(_HEADER)
        stat = source.stat()
    except OSError:
        return "missing"
    if len(header) < _HEADER or header[:4] != importlib.util.MAGIC_NUMBER:
        return "stale"
    flags = int.from_bytes(header[4:8], "little")
    if flags & 1:  # hash-based pyc (PEP 552): valid by construction unless checked, which imports do not do
        return "current"
    mtime = int.from_bytes(header[8:12], "little")
    size = int.from_bytes(header[12:16], "little")
    current = mtime == (int(stat.st_mtime) & 0xFFFFFFFF) and size == (stat.st_size & 0xFFFFFFFF)
    return "current" if current else "stale"


def python_sources(modules) -> list[tuple[str, Path, str | None]]:
    """(module name, source file, where its .pyc would be) for each loaded module that came from a .py file."""
    seen, result = set(), []
    for module in modules:
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if not origin or not origin.endswith(".py") or origin in seen:
            continue
        seen.add(origin)
        result.append((spec.name, Path(origin), getattr(spec, "cached", None)))
    return result


def import_cost_note() -> str:
    """What missing bytecode cost the imports on the one host where it was measured, with its source."""
    fig = measured.nearest(None, "import_seconds")
    if fig is None:
        return f"what it costs the imports was not measured on any machine in {measured.DATA_LABEL}"
    s = fig.values
    low, high = s["torch_with_bytecode"]
    return (f"measured on an {fig.gpu} host ({fig.cite}), the imports themselves took "
            f"{s['torch_without_bytecode']:g} s for torch without bytecode against {low:g}-{high:g} s with it, and "
            f"{s['inductor_without_bytecode']:g} against {s['inductor_with_bytecode']:g} s for torch's compiler "
            "stack")


def compile_cost(paths: list[Path], budget_s: float) -> tuple[float, int, int]:
    """(seconds, bytes compiled, files compiled): compile the sources in order until `budget_s` is spent."""
    spent, done_bytes, done_files = 0.0, 0, 0
    for path in paths:
        try:
            source = path.read_bytes()
        except OSError:
            continue
        started = time.perf_counter()
        try:
            compile(source, str(path), "exec", dont_inherit=True)
        except (SyntaxError, ValueError):
            continue
        spent += time.perf_counter() - started
        done_bytes += len(source)
        done_files += 1
        if spent >= budget_s:
            break
    return spent, done_bytes, done_files


def _root(path: Path, entries: list[str]) -> str:
    """The sys.path entry a module file was imported from (the longest one that contains it)."""
    text = str(path)
    best = ""
    for entry in entries:
        entry = entry.rstrip("/")
        if entry and text.startswith(entry + "/") and len(entry) > len(best):
            best = entry
    return best or str(path.parent)


def _why_not_written(ctx: ProbeContext, roots: list[str]) -> tuple[str, bool]:
    """(why Python did not write the bytecode, whether the package directories are writable)."""
    writable = all(os.access(root, os.W_OK) for root in roots)
    if ctx.env.get("PYTHONDONTWRITEBYTECODE"):
        return f"PYTHONDONTWRITEBYTECODE={ctx.env['PYTHONDONTWRITEBYTECODE']} tells Python not to write it", writable
    if sys.flags.dont_write_bytecode:
        return "python runs with -B, which tells it not to write bytecode", writable
    if not writable and not sys.pycache_prefix:
        return "the package directories are read-only, so Python cannot write it", writable
    return "Python did not write it (stale files, or a failed write)", writable


def fix_roots(missing_roots: list[str], ctx: ProbeContext) -> list[str]:
    """What the fix compiles: the directories the uncached modules came from, and every site-packages and
    PYTHONPATH directory, because diffusers and transformers are imported by generate, not by this worker."""
    import site

    candidates = list(missing_roots) + list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    candidates += [entry for entry in (ctx.env.get("PYTHONPATH") or "").split(os.pathsep)]
    roots: list[str] = []
    for entry in candidates:
        entry = entry.rstrip("/")
        if entry and os.path.isdir(entry) and entry not in roots:
            roots.append(entry)
    return roots


def _fix(roots: list[str], writable: bool) -> str:
    command = f"{shlex.quote(sys.executable)} -m compileall -q -j 0 " + " ".join(shlex.quote(r) for r in roots)
    if writable or sys.pycache_prefix:
        # compileall writes the files whatever PYTHONDONTWRITEBYTECODE says, and Python reads them either way.
        return command
    return ("export PYTHONPYCACHEPREFIX=$HOME/.cache/python-bytecode (and keep it in the environment: Python reads "
            f"the bytecode from there), then {command}")


def probe(ctx: ProbeContext) -> Finding:
    try:
        ctx.import_module("torch")  # every run imports it; in check's worker it already is
    except Exception as exc:
        return Finding(id="bytecode", status="skip", summary=f"torch does not import ({exc_line(exc)}): see torch_build")

    sources = python_sources(loaded_modules())
    missing = [(name, path) for name, path, cached in sources if bytecode_state(path, cached) != "current"]
    packages: dict[str, int] = {}
    for name, _ in missing:
        packages[name.split(".")[0]] = packages.get(name.split(".")[0], 0) + 1
    sizes = {path: path.stat().st_size for _, path in missing if path.exists()}
    missing_bytes = sum(sizes.values())
    measured = {"modules": len(sources), "without_bytecode": len(missing), "source_mb": round(missing_bytes / 1e6, 2),
                "packages": dict(sorted(packages.items(), key=lambda item: -item[1])[:10]),
                "pycache_prefix": sys.pycache_prefix, "compile_s": None, "estimated_s": 0.0}
    details = [(f"{len(sources)} modules loaded from .py files in this process (torch, its dependencies and "
                "what the other probes of this worker imported)")]
    if not missing:
        return Finding(id="bytecode", status="ok", measured=measured, details=details,
                       summary=f"cached bytecode is current for all {len(sources)} modules imported: "
                               "no process compiles torch's source at start-up")

    # In import order: the budget's sample has the mix of large and small files an import compiles.
    spent, done_bytes, done_files = compile_cost(list(sizes), COMPILE_BUDGET_S)
    rate = done_bytes / spent if spent > 0 else 0.0
    estimated = missing_bytes / rate if rate else 0.0
    measured.update(compile_s=round(spent, 4), compiled_files=done_files, estimated_s=round(estimated, 3))
    how = (f"compiling all of it took {spent:.2f} s here" if done_bytes >= missing_bytes else
           f"compiling {done_files} of the files ({done_bytes / 1e6:.1f} MB) took {spent:.2f} s here, "
           f"so all of it ~{estimated:.1f} s")
    how += f" (compile() alone, a lower bound: {import_cost_note()})"
    top = ", ".join(f"{pkg} {count}" for pkg, count in list(measured["packages"].items())[:5])
    details += [f"no current bytecode for {len(missing)} of them ({missing_bytes / 1e6:.1f} MB of source): {top}",
                f"{how}; each Python process that imports them pays it again"]
    roots = fix_roots(sorted({_root(path, sys.path) for _, path in missing}), ctx)
    why, writable = _why_not_written(ctx, roots)
    details.append(f"why: {why}")
    summary = (f"no cached bytecode for {len(missing)} of {len(sources)} imported modules: every Python process "
               f"compiles {missing_bytes / 1e6:.0f} MB of source again, at least ~{estimated:.1f} s here at each "
               "start")
    if estimated < WARN_S:
        summary = (f"cached bytecode for {len(sources) - len(missing)} of {len(sources)} imported modules; "
                   f"compiling the other {len(missing)} costs ~{estimated:.2f} s here at each start")
        return Finding(id="bytecode", status="ok", summary=summary, details=details, measured=measured)
    return Finding(id="bytecode", status="warn", summary=summary, details=details, measured=measured,
                   fix=_fix(roots, writable))
