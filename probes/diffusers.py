"""diffusers: the diffusers and transformers installed, and whether diffusers has the pieces qwendoctor
builds on (QwenImagePipeline, the attention dispatcher, cache hooks, regional compile)."""

from __future__ import annotations

import re

from probes.context import ProbeContext, exc_line
from qwendoctor.findings import Finding

UPGRADE = 'pip install -U "diffusers>=0.35"'
MIN_TRANSFORMERS = (4, 51)  # Qwen2.5-VL text encoder


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(text))[:3])


def _has(ctx: ProbeContext, module: str, attr: str) -> bool:
    try:
        return hasattr(ctx.import_module(module), attr)
    except Exception:
        return False


def probe(ctx: ProbeContext) -> Finding:
    try:
        diffusers = ctx.import_module("diffusers")
    except Exception as exc:
        return Finding(id="diffusers", status="fail", summary=f"diffusers does not import: {exc_line(exc)}",
                       fix=UPGRADE, measured={"diffusers": None})
    version = str(getattr(diffusers, "__version__", "?"))
    try:
        transformers = str(ctx.import_module("transformers").__version__)
    except Exception as exc:
        transformers, tf_error = None, exc_line(exc)

    # diffusers is a lazy module: dir() lists what it exports without importing the pipeline and, through
    # it, transformers' Qwen2.5-VL (seconds of the quick tier's budget).
    has_pipeline = "QwenImagePipeline" in dir(diffusers)
    model_mixin = getattr(diffusers, "ModelMixin", None)
    has_dispatcher = (_has(ctx, "diffusers.models.attention_dispatch", "dispatch_attention_fn")
                      and hasattr(model_mixin, "set_attention_backend"))
    has_cache_hooks = _has(ctx, "diffusers.hooks", "FirstBlockCacheConfig")
    has_regional_compile = hasattr(model_mixin, "compile_repeated_blocks")
    measured = {"diffusers": version, "transformers": transformers, "has_pipeline": has_pipeline,
                "has_dispatcher": has_dispatcher, "has_cache_hooks": has_cache_hooks,
                "has_regional_compile": has_regional_compile}
    details = [f"diffusers {version}", f"transformers {transformers}" if transformers else
               f"transformers missing: {tf_error}",
               f"QwenImagePipeline: {'yes' if has_pipeline else 'no'}",
               f"attention dispatcher (set_attention_backend): {'yes' if has_dispatcher else 'no'}",
               f"cache hooks (FirstBlockCacheConfig): {'yes' if has_cache_hooks else 'no'}",
               f"regional compile (compile_repeated_blocks): {'yes' if has_regional_compile else 'no'}"]
    summary = f"diffusers {version}, transformers {transformers or 'missing'}"

    def finding(status, why=None, fix=None):
        return Finding(id="diffusers", status=status, summary=f"{summary}: {why}" if why else summary,
                       details=details, fix=fix, measured=measured)

    if not has_pipeline:
        return finding("fail", "no QwenImagePipeline in this diffusers", UPGRADE)
    if transformers is None:
        return finding("fail", "transformers is missing (the Qwen2.5-VL text encoder needs it)",
                       'pip install "transformers>=4.51"')
    missing = [name for name, ok in [("attention dispatcher", has_dispatcher), ("cache hooks", has_cache_hooks),
                                     ("regional compile", has_regional_compile)] if not ok]
    if missing:
        return finding("warn", f"missing {', '.join(missing)}, so those levers are off", UPGRADE)
    if _version_tuple(transformers) < MIN_TRANSFORMERS:
        return finding("warn", "transformers older than 4.51 may not load the Qwen2.5-VL text encoder",
                       'pip install -U "transformers>=4.51"')
    return finding("ok")
