"""imports: do the packages `check` vouches for import? Each is imported, as qwendoctor uses it, in a fresh
interpreter with a time limit, so an import that raises, hangs or kills the interpreter is a finding, not the
doctor's end.

Package metadata can be in order while an import fails: huggingface_hub installed without its own requirement
httpx2 satisfies every requirement diffusers declares, yet `import diffusers.models.attention_dispatch` raises
ModuleNotFoundError. An import error is explained from the error itself (ModuleNotFoundError.name, the module
whose import statement failed) and from the installed packages' declared requirements, followed transitively
from the package imported, so the finding names the missing module, which package needs it, and the pip
command. The flash-attention packages are imported the same way by the flash_attn probe, not here.

Probes that import these packages in their own process use `import_or_block`: an import that fails there makes
the probe a `skip` that says why (measured["blocked_by"] = "imports"), not a crash with a traceback; the doctor
points it at this finding, or makes it a `fail` when this probe did not run or did not see the failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import sys
from collections import deque
from pathlib import Path
from typing import Any, Iterator

from probes._import_child import describe
from probes.context import ProbeContext
from probes.finding import Finding

IMPORT_TIMEOUT_S = 60.0  # per package: torch from a cold disk without bytecode takes seconds, never a minute
CHILD = Path(__file__).with_name("_import_child.py")
PROBE_ID = "imports"


@dataclasses.dataclass(frozen=True)
class Target:
    key: str  # the report's name, and the top-level module
    dist: str  # the distribution that provides it
    imports: str  # what qwendoctor imports: "module[:attr,attr][;module...]"
    used_for: str
    optional: bool = False  # imported only where installed; a failure is a warn (its levers are left out)
    gpu_only: bool = False  # imported only where NVML sees a GPU (what qwendoctor uses it for needs one)


TARGETS: tuple[Target, ...] = (
    Target("torch", "torch", "torch", "everything"),
    Target("transformers", "transformers", "transformers:Qwen2_5_VLForConditionalGeneration,Qwen2Tokenizer",
           "Qwen-Image's text encoder"),
    Target("diffusers", "diffusers",
           "diffusers:QwenImagePipeline;diffusers.models.attention_dispatch;diffusers.hooks:FirstBlockCacheConfig",
           "the pipeline, the attention dispatcher and the cache hooks"),
    Target("optuna", "optuna", "optuna;optuna.storages:JournalStorage,RDBStorage", "tune's study"),
    Target("torchao", "torchao",
           "torchao.quantization:Float8DynamicActivationFloat8WeightConfig,Float8WeightOnlyConfig,quantize_",
           "the FP8 levers", optional=True, gpu_only=True),
    Target("cache_dit", "cache-dit", "cache_dit", "the dbcache lever", optional=True),
)


# --- package metadata ------------------------------------------------------------------------------------

def canonical(name: str) -> str:
    """PEP 503's normal form: httpx2, huggingface-hub, cache-dit."""
    return re.sub(r"[-_.]+", "-", str(name)).lower()


def _version(metadata, dist: str) -> str | None:
    try:
        return str(metadata.version(dist))
    except Exception:  # PackageNotFoundError, or broken metadata
        return None


def dist_of(metadata, module: str | None) -> str | None:
    """The installed distribution that provides top-level module `module` (packages_distributions), else one
    whose name is the module's."""
    if not module:
        return None
    top = module.split(".")[0]
    try:
        owners = metadata.packages_distributions().get(top) or []
    except Exception:  # an importlib.metadata without it, or a broken entry
        owners = []
    if owners:
        return str(owners[0])
    return canonical(top) if _version(metadata, top) is not None else None


def requirements(metadata, dist: str, extras=()) -> list:
    """The packaging Requirements `dist` declares that apply here (its core ones, and those of `extras`)."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        declared = metadata.requires(dist) or []
    except Exception:
        return []
    found = []
    for text in declared:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is not None and not any(req.marker.evaluate({"extra": extra}) for extra in ("", *extras)):
            continue  # another platform's, or an extra nobody asked for
        found.append(req)
    return found


def walk_requirements(metadata, root: str) -> Iterator[tuple[list[str], Any]]:
    """(path, requirement) for every requirement that applies here, breadth first from `root` through the
    installed packages: `path` runs from root to the package that declares the requirement."""
    queue = deque([([root], ())])
    seen = {canonical(root)}
    while queue:
        path, extras = queue.popleft()
        for req in requirements(metadata, path[-1], extras):
            yield path, req
            name = canonical(req.name)
            if name not in seen and _version(metadata, req.name) is not None:
                seen.add(name)
                queue.append((path + [req.name], tuple(req.extras)))


def _all_dists(metadata) -> list[str]:
    try:
        return sorted({str(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]})
    except Exception:
        return []


def who_requires(metadata, module: str, roots: list[str]) -> tuple[list[str], Any] | None:
    """(path, requirement) of the package that declares what provides missing top-level `module`: found from
    `roots` through their requirements, else from any installed package. A module named unlike its
    distribution (yaml, PyYAML) is matched when the last root lacks exactly one requirement."""
    wanted = canonical(module)
    for root in roots:
        for path, req in walk_requirements(metadata, root):
            if canonical(req.name) == wanted:
                return path, req
    for dist in _all_dists(metadata):
        for req in requirements(metadata, dist):
            if canonical(req.name) == wanted:
                return [dist], req
    if roots:
        absent = [req for req in requirements(metadata, roots[-1]) if _version(metadata, req.name) is None]
        if len(absent) == 1:
            return [roots[-1]], absent[0]
    return None


def _pin(req) -> str:
    """A requirement as pip takes it on a command line: name, extras, version range; no marker."""
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    text = f"{req.name}{extras}{req.specifier}"
    return f'"{text}"' if extras or req.specifier else text


def diagnose(info: dict, metadata, root: str | None) -> dict:
    """From `describe`'s account of an import error and the installed packages: the reason (one clause), the
    distribution to install, the chain of packages that needs it, and the pip command (None where no package
    can be named)."""
    importer = dist_of(metadata, info.get("importer"))
    roots = [r for r in (root, importer) if r]
    found: dict[str, Any] = {"missing": info.get("missing"), "dist": None, "required_by": None, "pip": None,
                             "reason": info.get("error") or "import failed"}
    missing = info.get("missing")
    if missing:
        top = missing.split(".")[0]
        owner = dist_of(metadata, top)
        if owner is not None:
            version = _version(metadata, owner)
            if top != missing:
                found["reason"] = (f"no module named '{missing}': {owner} {version} lacks it (an older release "
                                   "than the importing package needs, or a broken install)")
                found["pip"] = f"python -m pip install -U {owner}"
            else:
                found["reason"] = (f"no module named '{missing}', though {owner} {version} is installed: a broken "
                                   "install")
                found["pip"] = f"python -m pip install --force-reinstall --no-deps {owner}"
            found["dist"] = owner
            return found
        chain = who_requires(metadata, top, roots)
        if chain is not None:
            path, req = chain
            found.update(dist=req.name, required_by=path, pip=f"python -m pip install {_pin(req)}")
            via = f" ({' -> '.join(path + [req.name])})" if len(path) > 1 else ""
            found["reason"] = f"no module named '{missing}', which {path[-1]} requires{via}, is not installed"
        else:
            dist = canonical(top)
            found.update(dist=dist, pip=f"python -m pip install {dist}")
            by = f"{info['importer']} imports it, " if info.get("importer") else ""
            found["reason"] = (f"no module named '{missing}' ({by}no installed package declares it; "
                               f"{dist} is its likely distribution)")
        return found
    if info.get("cannot_import"):
        source = info.get("from_module") or "?"
        owner = dist_of(metadata, source)
        if owner is not None:
            version = _version(metadata, owner)
            wanted = next((req for req in requirements(metadata, importer) if canonical(req.name) == canonical(owner)),
                          None) if importer else None
            need = f"; {importer} requires {wanted}" if wanted is not None and wanted.specifier else ""
            found["reason"] = (f"cannot import name '{info['cannot_import']}' from '{source}' ({owner} {version}"
                               f"{need}): the installed versions do not match")
            found.update(dist=owner, pip=f"python -m pip install -U {_pin(wanted) if wanted is not None else owner}")
    return found


def _metadata(ctx: ProbeContext):
    try:
        return ctx.import_module("importlib.metadata")
    except Exception:  # a test's strict fake: the real metadata serves
        import importlib.metadata

        return importlib.metadata


def explain(ctx: ProbeContext, module: str, exc: BaseException) -> dict:
    """describe + diagnose for an import of `module` that raised `exc` in this process."""
    metadata = _metadata(ctx)
    info = describe(exc)
    return {**info, **diagnose(info, metadata, dist_of(metadata, module) or module.split(".")[0])}


def blocked(ctx: ProbeContext, probe_id: str, module: str, exc: BaseException) -> Finding:
    """The Finding of a probe that cannot run because `module` does not import here: a skip that names the
    missing module, who needs it and the pip command; the doctor points it at the imports finding."""
    found = explain(ctx, module, exc)
    details = [f"importing {module}: {found['error']}"] + [f"  caused by {line}" for line in found["chain"]]
    if found["at"]:
        details.append(f"  failed at {found['at']}")
    return Finding(id=probe_id, status="skip", summary=f"blocked: {module} does not import: {found['reason']}",
                   details=details, fix=found["pip"] or "`qwendoctor check --only imports -v` shows the import error",
                   measured={"blocked_by": PROBE_ID, "module": module,
                             **{k: found[k] for k in ("error", "missing", "dist", "required_by", "pip")}})


def import_or_block(ctx: ProbeContext, probe_id: str, module: str) -> tuple[Any, Finding | None]:
    """(the module, None), or (None, the blocked Finding) when importing it raises."""
    try:
        return ctx.import_module(module), None
    except Exception as exc:  # ImportError, or what a broken package raises while it imports (OSError, ...)
        return None, blocked(ctx, probe_id, module, exc)


def crash_fix(probe_id: str, exc: BaseException) -> str:
    """The fix line of a probe that crashed: the pip command when an import failed, then how to see it all."""
    rerun = f"run `python -m probes._worker {probe_id}` to see the full output"
    info = describe(exc)
    if not (info["missing"] or info["cannot_import"]):
        return rerun
    import importlib.metadata

    found = diagnose(info, importlib.metadata, None)
    return f"{found['pip']} ({found['reason']}); then {rerun}" if found["pip"] else rerun


# --- the probe -------------------------------------------------------------------------------------------

def _stuck_at(stderr: str) -> str | None:
    """The innermost frame outside importlib in faulthandler's dump of the thread running the imports (a
    package's own threads may be dumped before it)."""
    blocks = re.split(r"^(?:Thread 0x[0-9a-f]+|Current thread 0x[0-9a-f]+).*$", stderr or "", flags=re.MULTILINE)
    for block in sorted(blocks, key=lambda text: CHILD.name not in text):
        for line in block.splitlines():
            match = re.match(r'\s*File "([^"]+)", line (\d+) in (\S+)', line)
            if match and not match.group(1).startswith("<frozen ") and not match.group(1).endswith(CHILD.name):
                return f"{match.group(1)}:{match.group(2)} in {match.group(3)}"
    return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(nothing on stderr)"


def run_imports(ctx: ProbeContext, targets: list[Target], timeout_s: float) -> dict[str, dict]:
    """key -> the child's result for each target. A target that hangs or kills the child gets a result made
    here (state "hangs" or "crashes"), and the targets after it run in a new child."""
    results: dict[str, dict] = {}
    pending = list(targets)
    while pending:
        argv = [sys.executable, "-P", str(CHILD), f"{timeout_s:g}", *(f"{t.key}={t.imports}" for t in pending)]
        # The child ends itself when an import outlives timeout_s; this limit is for a child that cannot.
        res = ctx.run(argv, timeout_s * len(pending) + 30.0)
        started = None
        for line in (res.stdout or "").splitlines():
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if "start" in data:
                started = data["start"]
            elif data.get("key") in {t.key for t in pending}:
                results[data["key"]] = data
                started = None
        err = res.stderr or ""
        if started is not None:
            if "Timeout (" in err or res.returncode == 124:
                results[started] = {"key": started, "ok": False, "state": "hangs", "stuck_at": _stuck_at(err),
                                    "error": f"no answer within the limit of {timeout_s:g} s"}
            else:
                if res.returncode is not None and res.returncode < 0:
                    try:
                        how = f"killed by {signal.Signals(-res.returncode).name}"
                    except ValueError:
                        how = f"killed by signal {-res.returncode}"
                else:
                    how = f"exited with code {res.returncode}: {_last_line(err)}"
                results[started] = {"key": started, "ok": False, "state": "crashes", "error": how}
        left = [t for t in pending if t.key not in results]
        if len(left) == len(pending):  # no progress: the child did not start, or died before its first import
            for t in left:
                results[t.key] = ({"key": t.key, "ok": False, "state": "hangs", "stuck_at": None,
                                   "error": f"no answer within the limit of {timeout_s * len(pending) + 30.0:g} s"}
                                  if res.returncode == 124 else
                                  {"key": t.key, "ok": False, "state": "crashes",
                                   "error": f"the import child exited with code {res.returncode}: {_last_line(err)}"})
            break
        pending = left
    return results


def _installed(ctx: ProbeContext, target: Target) -> bool:
    try:
        return ctx.import_module("importlib.util").find_spec(target.key) is not None
    except Exception:
        return False


def _has_gpu(ctx: ProbeContext) -> bool:
    try:
        nvml = ctx.nvml()
    except Exception:
        return False
    try:
        return int(nvml.nvmlDeviceGetCount()) > 0
    except Exception:
        return False
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


# Variables a library reads when imported and refuses with an import error (its value in the message).
IMPORT_TIME_ENV = ("DIFFUSERS_ATTN_BACKEND",)


def _refused_env(result: dict) -> str | None:
    """`NAME='value'` if the import failed over a variable of IMPORT_TIME_ENV (its value is in the error)."""
    text = " ".join([str(result.get("error") or "")] + [str(line) for line in result.get("chain") or []])
    for name in IMPORT_TIME_ENV:
        value = os.environ.get(name)
        if value and (repr(value) in text or f"'{value}'" in text or "AttentionBackendName" in text):
            return f"{name}={value!r}"
    return None


def _fix(target: Target, state: str, pip: str | None) -> str:
    if pip:
        return pip
    reinstall = f"python -m pip install --force-reinstall --no-deps {target.dist}"
    if state == "hangs":
        return f"python -X importtime -c 'import {target.key}' shows the import it stops in; or {reinstall}"
    if state == "crashes":
        return f"{reinstall} (a build for this Python, torch and CUDA)"
    return f"{reinstall} (a build for this Python and torch; the details have the error)"


def probe(ctx: ProbeContext) -> Finding:
    metadata = _metadata(ctx)
    gpu = any(t.gpu_only for t in TARGETS) and _has_gpu(ctx)
    chosen, left_out = [], []
    for target in TARGETS:
        if target.gpu_only and not gpu:
            left_out.append(f"{target.key}: not imported without a GPU (for {target.used_for}, which need one)")
        elif target.optional and not _installed(ctx, target):
            left_out.append(f"{target.key}: not installed (optional: {target.used_for})")
        else:
            chosen.append(target)
    results = run_imports(ctx, chosen, IMPORT_TIMEOUT_S)

    packages: dict[str, dict] = {}
    details: list[str] = []
    problems: list[tuple[Target, str, str | None]] = []  # (target, clause, fix)
    first_of: dict[tuple, str] = {}  # an error's signature -> the first package that showed it
    for target in chosen:
        result = results[target.key]
        entry: dict[str, Any] = {"state": "ok", "seconds": result.get("seconds"), "error": None}
        packages[target.key] = entry
        if result.get("ok"):
            details.append(f"{target.key}: imports in {result['seconds']:.2f} s here ({target.imports})")
            continue
        state = result.get("state") or "fails"
        entry.update(state=state, error=result.get("error"))
        if state == "hangs":
            entry["stuck_at"] = result.get("stuck_at")
            where = f", stuck at {result['stuck_at']}" if result.get("stuck_at") else ""
            clause = f"importing {target.key} hangs: {result['error']}{where}"
            details.append(clause)
            problems.append((target, clause, _fix(target, state, None)))
            continue
        if state == "crashes":
            clause = f"importing {target.key} kills the interpreter ({result['error']})"
            details.append(clause)
            problems.append((target, clause, _fix(target, state, None)))
            continue
        found = diagnose(result, metadata, target.dist)
        if result.get("missing") == target.key and dist_of(metadata, target.key) is None:
            entry["state"] = state = "missing"
            found.update(reason=f"{target.dist} is not installed (needed for {target.used_for})", dist=target.dist,
                         required_by=None, pip=f"python -m pip install {target.dist}")
        entry.update({k: found[k] for k in ("missing", "dist", "required_by", "pip")})
        details.append(f"{target.key}: {result.get('error')}")
        details += [f"  caused by {line}" for line in result.get("chain") or []]
        if result.get("at"):
            details.append(f"  failed at {result['at']}")
        refused_env = _refused_env(result)
        if refused_env is not None:
            # Not a broken install: a variable diffusers reads at import. Reinstalling would change nothing.
            problems.append((target, f"{target.key} does not import: {refused_env} is refused by diffusers",
                             f"unset {refused_env.split('=', 1)[0]} (qwendoctor sets the tuned attention backend "
                             "itself)"))
            continue
        signature = (result.get("missing"), result.get("cannot_import"), result.get("at"))
        same = first_of.get(signature) if any(signature) else None
        first_of.setdefault(signature, target.key)
        if same:
            problems.append((target, f"{target.key} fails the same way as {same}", None))
        elif state == "missing":
            problems.append((target, found["reason"], found["pip"]))
        else:
            problems.append((target, f"{target.key} does not import: {found['reason']}",
                             _fix(target, state, found["pip"])))
    details += left_out
    details.append(f"each imported as qwendoctor uses it, in a fresh interpreter, with a limit of "
                   f"{IMPORT_TIMEOUT_S:g} s per package; the flash-attention packages are the flash_attn probe's to "
                   "import")
    measured = {"packages": packages, "failed": [t.key for t, _, _ in problems if not t.optional],
                "optional_failed": [t.key for t, _, _ in problems if t.optional]}

    if not problems:
        total = sum(packages[t.key]["seconds"] or 0.0 for t in chosen)
        return Finding(id=PROBE_ID, status="ok", details=details, measured=measured,
                       summary=f"{', '.join(t.key for t in chosen)} import in a fresh interpreter ({total:.1f} s "
                               "here)")
    required = [p for p in problems if not p[0].optional]
    shown = required or problems
    summary = "; ".join(clause for _, clause, _ in shown[:2]) + (f" (and {len(shown) - 2} more)" if len(shown) > 2
                                                                 else "")
    if not required:
        summary += f": {', '.join(t.used_for for t, _, _ in problems)} left out"
    fix = "; ".join(dict.fromkeys(fix for _, _, fix in problems if fix))
    return Finding(id=PROBE_ID, status="fail" if required else "warn", summary=summary, details=details, fix=fix,
                   measured=measured)
