"""model: are the weights for `--model` on this machine, without downloading anything?

A local directory (a diffusers pipeline: model_index.json, *.safetensors) or a Hugging Face id already in the
hub cache (HF_HUB_CACHE / HF_HOME from the context's env; only `local_files_only` look-ups, never the network).
Sharded weights are checked against their *.safetensors.index.json, so a half-finished download shows up here,
not as a stack trace 40 GB into loading.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from pathlib import Path

from probes.context import ProbeContext, exc_line
from probes.finding import Finding

GIB = 1024**3
BUILTIN = ("tiny", "synthetic")
REAL_MODEL = "Qwen/Qwen-Image"
HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")  # "org/name" or "name"
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F8_E4M3": "float8_e4m3fn",
                      "F8_E5M2": "float8_e5m2", "I8": "int8", "U8": "uint8"}


def download_fix(model: str) -> str:
    return (f"hf download {model}  (huggingface_hub < 1.0: huggingface-cli download {model}); "
            f"~57 GB for Qwen/Qwen-Image. `--model synthetic` tunes speed without the weights")


def _safetensors_dtype(path: Path) -> str | None:
    """The most common tensor dtype in a safetensors file, from its JSON header (no tensor data read)."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100_000_000:
                return None
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error):
        return None
    counts = Counter(v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict))
    if not counts:
        return None
    dtype = counts.most_common(1)[0][0]
    return SAFETENSORS_DTYPES.get(dtype, str(dtype).lower())


def inspect_dir(root: Path) -> dict:
    """What a pipeline directory holds: model_index.json, total safetensors size, dtype, missing shards."""
    files = sorted(root.rglob("*.safetensors"))
    sizes, broken = 0, []
    for f in files:
        try:
            sizes += f.stat().st_size  # follows the HF cache's symlinks into blobs/
        except OSError:
            broken.append(str(f.relative_to(root)))
    missing = list(broken)
    for index in root.rglob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError) as exc:
            missing.append(f"{index.relative_to(root)} unreadable: {exc_line(exc)}")
            continue
        missing += [str((index.parent / s).relative_to(root)) for s in sorted(shards)
                    if not (index.parent / s).exists() and str((index.parent / s).relative_to(root)) not in missing]
    dtype = None
    config = root / "transformer" / "config.json"
    if config.is_file():
        try:
            dtype = json.loads(config.read_text()).get("torch_dtype")
        except (OSError, ValueError):
            pass
    if dtype is None:
        tfiles = sorted((root / "transformer").glob("*.safetensors")) or files
        dtype = next((d for d in map(_safetensors_dtype, tfiles[:1]) if d), None)
    return {"model_index": (root / "model_index.json").is_file(), "files": len(files),
            "size_gib": round(sizes / GIB, 2), "dtype": dtype, "missing": missing}


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or not HF_ID.match(model)


def _hf_snapshot(ctx: ProbeContext, model: str) -> tuple[Path | None, str]:
    """The cached snapshot folder of `model` (refs/main), or None with the reason. Never touches the network."""
    cache = Path(ctx.disk_paths["hf_cache"])
    try:
        hub = ctx.import_module("huggingface_hub")
        path = hub.snapshot_download(model, cache_dir=str(cache), local_files_only=True)
        return Path(path), f"in the HF cache {cache}"
    except ImportError:
        pass
    except Exception as exc:
        return None, f"not in the HF cache {cache}: {exc_line(exc)}"
    # No huggingface_hub: read the cache layout directly (models--org--name/refs/main -> snapshots/<sha>).
    repo = cache / ("models--" + model.replace("/", "--"))
    try:
        sha = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None, f"not in the HF cache {cache} (no {repo.name}/refs/main)"
    snap = repo / "snapshots" / sha
    return (snap, f"in the HF cache {cache}") if snap.is_dir() else (None, f"snapshot {sha} missing in {repo}")


def probe(ctx: ProbeContext) -> Finding:
    model = ctx.model
    measured = {"model": model, "found": False, "path": None, "size_gib": None, "dtype": None}
    if model in BUILTIN:
        measured.update(found=True)
        what = {"tiny": "trained weights shipped in the package",
                "synthetic": "random weights made on the GPU"}[model]
        # The real model as information: on this machine it is not what the commands run by default.
        real, where = _hf_snapshot(ctx, REAL_MODEL)
        measured["real_model_downloaded"] = real is not None
        note = (f"{REAL_MODEL} is {where}" if real is not None else
                f"{REAL_MODEL} is not downloaded; when you want it: {download_fix(REAL_MODEL)}")
        return Finding(id="model", status="ok", measured=measured, details=[note],
                       summary=f"built-in '{model}' model: {what}, nothing to download")

    local = Path(model).expanduser()
    explicit_path = _looks_like_path(model)
    if local.exists() or explicit_path:
        if not local.is_dir():
            why = "does not exist" if not local.exists() else "is not a directory"
            return Finding(id="model", status="fail", summary=f"model path {model} {why}", measured=measured,
                           fix=f"point --model at a diffusers pipeline directory (with model_index.json), "
                               f"or download one: hf download Qwen/Qwen-Image --local-dir {model}")
        where, root = "local directory", local.resolve()
    else:
        root, where = _hf_snapshot(ctx, model)
        if root is None:
            return Finding(id="model", status="warn", summary=f"{model} is not downloaded ({where.split(':')[0]})",
                           details=[where, "qwendoctor never downloads weights by itself"],
                           fix=download_fix(model), measured=measured)

    info = inspect_dir(root)
    measured.update(path=str(root), size_gib=info["size_gib"], dtype=info["dtype"])
    details = [f"{where}: {root}", f"{info['files']} safetensors files, {info['size_gib']:.1f} GiB, "
                                   f"dtype {info['dtype'] or 'unknown'}"]
    problems = []
    if not info["model_index"]:
        problems.append("no model_index.json (not a diffusers pipeline directory)")
    if info["files"] == 0:
        problems.append("no *.safetensors weights")
    if info["missing"]:
        problems.append(f"{len(info['missing'])} weight files missing or broken: {', '.join(info['missing'][:3])}"
                        + (" ..." if len(info["missing"]) > 3 else ""))
    if problems:
        details += problems
        status = "fail" if where == "local directory" else "warn"
        fix = download_fix(model) + " (resumes a partial download)" if status == "warn" else \
            f"re-copy or re-download the pipeline into {root}: hf download Qwen/Qwen-Image --local-dir {root}"
        return Finding(id="model", status=status, summary=f"{model} is incomplete: {problems[0]}",
                       details=details, fix=fix, measured=measured)
    measured["found"] = True
    return Finding(id="model", status="ok", details=details, measured=measured,
                   summary=f"{model}: {info['size_gib']:.1f} GiB of weights ({info['dtype'] or 'dtype unknown'}), "
                           f"{where}")
