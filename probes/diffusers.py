"""diffusers: the diffusers and transformers installed, and whether diffusers has the pieces qwendoctor
builds on (QwenImagePipeline, the attention dispatcher, cache hooks, regional compile).

It imports neither: importing diffusers imports torch and torch._dynamo (seconds, in every process that does
it). Versions come from package metadata, the pieces from diffusers' own source (parsed, not run), and each
package's declared requirements, and theirs in turn, are checked against what is installed. Metadata can be in
order while an import still fails: the imports probe imports both in a fresh interpreter, and
attention_backends calls diffusers' dispatcher.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from probes.context import ProbeContext, exc_line
from probes.finding import Finding

UPGRADE = 'pip install -U "diffusers>=0.35"'
MIN_TRANSFORMERS = (4, 51)  # Qwen2.5-VL text encoder


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(text))[:3])


def _dist_version(metadata, name: str) -> str | None:
    try:
        return str(metadata.version(name))
    except Exception:  # PackageNotFoundError, or broken metadata
        return None


def _package_dir(util, name: str) -> tuple[Path | None, str | None]:
    """(the package's directory, why not): find_spec of a top-level name runs none of its code."""
    try:
        spec = util.find_spec(name)
    except Exception as exc:  # ValueError for a module without a spec, an import hook's error
        return None, exc_line(exc)
    if spec is None:
        return None, f"no module named {name!r} on sys.path"
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        return None, f"{name} is a single module ({spec.origin}), not the package"
    return Path(locations[0]), None


def unmet_requirements(metadata, dist: str) -> list[str]:
    """The requirements of `dist` (without its extras) and, transitively, of the installed packages it requires,
    that the installed packages do not satisfy: importing dist imports those packages too, and a requirement
    of huggingface_hub that is missing breaks diffusers as surely as one of diffusers' own."""
    from packaging.version import InvalidVersion

    from probes.imports import walk_requirements

    problems = []
    for path, req in walk_requirements(metadata, dist):
        through = f" (through {' -> '.join(path)})" if len(path) > 1 else ""
        installed = _dist_version(metadata, req.name)
        if installed is None:
            problems.append(f"{path[-1]} requires {req}, which is not installed{through}")
            continue
        try:
            met = not req.specifier or req.specifier.contains(installed, prereleases=True)
        except InvalidVersion:  # a version string packaging cannot compare: not ours to judge
            met = True
        if not met:
            problems.append(f"{path[-1]} requires {req}, {req.name} {installed} is installed{through}")
    return problems


class Source:
    """A package's modules, each parsed once, asked what they define without running them."""

    def __init__(self, root: Path):
        self.root = root
        self._trees: dict[str, ast.Module | None] = {}

    def path(self, module: str) -> Path | None:
        """module is dotted, relative to the package ("" is its __init__)."""
        base = self.root.joinpath(*module.split(".")) if module else self.root
        for candidate in ([base.with_suffix(".py")] if module else []) + [base / "__init__.py"]:
            if candidate.is_file():
                return candidate
        return None

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            path = self.path(module)
            try:
                self._trees[module] = ast.parse(path.read_text(encoding="utf-8")) if path else None
            except (OSError, SyntaxError, ValueError):
                self._trees[module] = None
        return self._trees[module]

    def _resolve(self, module: str, node: ast.ImportFrom) -> str | None:
        """The package-relative module that `from .x import y` (or `from <package>.x import y`) in `module`
        names; None for other packages."""
        if not node.level:
            name = node.module or ""
            if name == self.root.name or name.startswith(self.root.name + "."):
                return name[len(self.root.name) + 1:]
            return None
        path = self.path(module)
        package = module.split(".") if module and path and path.name == "__init__.py" else module.split(".")[:-1]
        package = [p for p in package if p]
        if node.level - 1 > len(package):
            return None
        parts = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
        return ".".join(parts)

    def _origin(self, module: str, name: str, depth: int):
        """(module, node) where `name` is defined, following re-exports within the package a few levels."""
        tree = self.tree(module)
        if tree is None or depth > 4:
            return None
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return module, node
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        target = self._resolve(module, node)
                        if target is not None:
                            return self._origin(target, alias.name, depth + 1)
        return None

    def defines(self, module: str, name: str) -> bool:
        return self._origin(module, name, 0) is not None

    def has_method(self, module: str, cls: str, method: str, depth: int = 0) -> bool:
        """Whether class `cls` (found from `module`) or one of its package-local bases defines `method`."""
        found = self._origin(module, cls, depth)
        if found is None or not isinstance(found[1], ast.ClassDef):
            return False
        where, node = found
        if any(isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == method
               for item in node.body):
            return True
        return any(isinstance(base, ast.Name) and depth < 4 and self.has_method(where, base.id, method, depth + 1)
                   for base in node.bases)

    def exports(self, name: str) -> bool:
        """The package's top level offers `name`: diffusers lists its lazy exports as strings."""
        tree = self.tree("")
        if tree is None:
            return False
        return any(isinstance(node, ast.Constant) and node.value == name for node in ast.walk(tree)) \
            or self.defines("", name)

    def defines_in(self, package: str, name: str) -> bool:
        """Some module of sub-package `package` defines class/function `name` (text first, then parsed)."""
        directory = self.root.joinpath(*package.split("."))
        pattern = re.compile(rf"^\s*(class|def)\s+{re.escape(name)}\b", re.MULTILINE)
        for path in sorted(directory.glob("*.py")) if directory.is_dir() else []:
            try:
                if not pattern.search(path.read_text(encoding="utf-8")):
                    continue
            except OSError:
                continue
            if self.defines(f"{package}.{path.stem}" if path.stem != "__init__" else package, name):
                return True
        return False


# What qwendoctor uses -> where diffusers defines it (package-relative module) and what to look for.
PIECES = {
    "pipeline": "QwenImagePipeline (exported, and a class in pipelines/qwenimage)",
    "dispatcher": "attention dispatcher (dispatch_attention_fn, ModelMixin.set_attention_backend)",
    "cache_hooks": "cache hooks (FirstBlockCacheConfig in diffusers.hooks)",
    "regional_compile": "regional compile (ModelMixin.compile_repeated_blocks)",
}


def find_pieces(source: Source) -> dict[str, bool]:
    return {
        "pipeline": source.exports("QwenImagePipeline")
        and source.defines_in("pipelines.qwenimage", "QwenImagePipeline"),
        "dispatcher": source.defines("models.attention_dispatch", "dispatch_attention_fn")
        and source.has_method("models.modeling_utils", "ModelMixin", "set_attention_backend"),
        "cache_hooks": source.defines("hooks", "FirstBlockCacheConfig"),
        "regional_compile": source.has_method("models.modeling_utils", "ModelMixin", "compile_repeated_blocks"),
    }


def probe(ctx: ProbeContext) -> Finding:
    metadata = ctx.import_module("importlib.metadata")
    util = ctx.import_module("importlib.util")
    version = _dist_version(metadata, "diffusers")
    root, why_not = _package_dir(util, "diffusers")
    if root is None:
        where = f"diffusers {version} has package metadata but is not importable: {why_not}" if version else \
            f"diffusers is not installed ({why_not})"
        return Finding(id="diffusers", status="fail", summary=where, fix=UPGRADE,
                       details=["metadata: " + (f"diffusers {version}" if version else "none")],
                       measured={"diffusers": version, "diffusers_path": None})
    transformers = _dist_version(metadata, "transformers")
    tf_root, tf_why = _package_dir(util, "transformers")
    pieces = find_pieces(Source(root))
    unmet: list[str] = []
    for line in (unmet_requirements(metadata, "diffusers") if version else []) + \
            (unmet_requirements(metadata, "transformers") if transformers else []):
        if not any(seen.split(" (through ")[0] == line.split(" (through ")[0] for seen in unmet):
            unmet.append(line)  # huggingface_hub's, once, though both packages require it
    measured = {"diffusers": version, "transformers": transformers, "diffusers_path": str(root),
                "has_pipeline": pieces["pipeline"], "has_dispatcher": pieces["dispatcher"],
                "has_cache_hooks": pieces["cache_hooks"], "has_regional_compile": pieces["regional_compile"],
                "unmet_requirements": unmet}
    details = [f"diffusers {version or '(no package metadata: version unknown)'} at {root}",
               f"transformers {transformers}" + (f" at {tf_root}" if tf_root else f", but {tf_why}")
               if transformers else f"transformers: no package metadata ({tf_why or 'found on sys.path'})"]
    details += [f"{label}: {'yes' if pieces[key] else 'no'}" for key, label in PIECES.items()]
    details += [f"unmet requirement: {line}" for line in unmet]
    details.append("read from package metadata and diffusers' source without importing it; the imports probe "
                   "imports it, and attention_backends runs its dispatcher")
    summary = f"diffusers {version or '?'}, transformers {transformers or 'missing'}"

    def finding(status, why=None, fix=None):
        return Finding(id="diffusers", status=status, summary=f"{summary}: {why}" if why else summary,
                       details=details, fix=fix, measured=measured)

    if not pieces["pipeline"]:
        return finding("fail", "no QwenImagePipeline in this diffusers", UPGRADE)
    if transformers is None or tf_root is None:
        why = "transformers is missing" if transformers is None and tf_root is None else \
            "transformers has no package metadata" if transformers is None else \
            f"transformers is installed but not importable ({tf_why})"
        return finding("fail", f"{why} (the Qwen2.5-VL text encoder needs it)",
                       'pip install --force-reinstall "transformers>=4.51"')
    if unmet:
        names = sorted({re.split(r"[ ,<>=!~;\[]", line.split(" requires ", 1)[1])[0] for line in unmet})
        # As `pip check` would. Metadata is not the import: diffusers 0.42 declares importlib_metadata and imports
        # without it on Python 3.8+, while a missing requirement of huggingface_hub breaks it. Whether the imports
        # break is the imports probe's verdict (a fail there); here it is a warn.
        more = f" (and {len(unmet) - 1} more)" if len(unmet) > 1 else ""
        return finding("warn", f"unmet requirement: {unmet[0]}{more}; the imports probe says whether the imports "
                               "break", f"pip install -U {' '.join(names)}")
    missing = [PIECES[key].split(" (")[0] for key in ("dispatcher", "cache_hooks", "regional_compile")
               if not pieces[key]]
    if missing:
        return finding("warn", f"missing {', '.join(missing)}, so those levers are off", UPGRADE)
    if _version_tuple(transformers) < MIN_TRANSFORMERS:
        return finding("warn", "transformers older than 4.51 may not load the Qwen2.5-VL text encoder",
                       'pip install -U "transformers>=4.51"')
    if version is None:
        return finding("warn", "diffusers has no package metadata, so its version is unknown (a source tree on "
                               "the path?)", "install it with pip (pip install -e <checkout> for a checkout)")
    return finding("ok")
