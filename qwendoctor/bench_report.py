"""The bench's results as a reader sees them: the tiers (the fastest lossless and FP8 rows) and the markdown
table written beside the JSON. Reads the result document only; measures nothing.
"""

from __future__ import annotations

import math
from typing import Any

from qwendoctor import levers, quality
from qwendoctor.profile import Profile
from qwendoctor.step_profile import KERNEL_CHANGES, KINDS, TOP_KERNELS

# Fidelity floors of the two tiers, against the default's image on the same seed.
LOSSLESS_PSNR_DB = 40.0
FP8_PSNR_DB = 30.0


def tiers(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """The fastest row of each tier: lossless (no lossy lever beyond the default's, PSNR >= 40 dB against the
    default) and FP8 (PSNR >= 30 dB)."""
    default = next(r for r in rows if r["id"] == "default")

    def best(condition) -> dict[str, Any] | None:
        candidates = [r for r in rows if "step_ms" in r and "psnr_db" in r and condition(r)]
        if not candidates:
            return None
        row = min(candidates, key=lambda r: r["step_ms"])
        return {"id": row["id"], "describe": row["describe"], "step_ms": row["step_ms"],
                "speedup": default["step_ms"] / row["step_ms"], "psnr_db": row["psnr_db"],
                "s_per_image": row["s_per_image"]}

    reference = Profile.from_dict(default["profile"])  # the placement's default under a memory plan

    def lossless(row) -> bool:
        return (not levers.is_lossy(Profile.from_dict(row["profile"]), reference)
                and row["psnr_db"] >= LOSSLESS_PSNR_DB)

    def fp8(row) -> bool:
        return row["profile"].get("quantization", "none").startswith("fp8") and row["psnr_db"] >= FP8_PSNR_DB

    return {"lossless": best(lossless), "fp8": best(fp8)}


def _row_line(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"skipped ({row['skipped']})"
    if "failed" in row:
        return f"failed ({row['failed']})"
    return (f"{row['step_ms']:.1f} ms/step, {row['s_per_image']:.2f} s/image, warm-up {row['warmup_s']:.1f} s, "
            f"PSNR {_db(row['psnr_db'])}")


def _db(value: float) -> str:
    # quality.compare counts an identical image at PSNR_CEILING_DB (older results: infinity)
    return "exact" if value >= quality.PSNR_CEILING_DB else f"{value:.1f} dB"


def markdown(document: dict[str, Any]) -> str:
    w = document["workload"]
    rows = document["rows"]
    default = next((r for r in rows if r["id"] == "default" and "step_ms" in r), None)
    ceiling = document.get("gemm_ceiling") or {}
    lines = [
        f"# qwendoctor bench: {w['model']} {_task(w)}{w['width']}x{w['height']}, {w['reference_steps']} steps, "
        f"true CFG {w['true_cfg_scale']:g}",
        "",
        f"Command: `{document.get('command')}`  ",
        f"Device: {document['fingerprint'].get('gpu_name') or 'CPU'}; torch {document['fingerprint'].get('torch')}, "
        f"diffusers {document['fingerprint'].get('diffusers')}; {document['date']}  ",
        f"Rendered {document['render_steps']} steps per row; bf16 GEMM ceiling measured in this run: "
        + (f"{ceiling['bf16_tflops']:.0f} TFLOP/s" if ceiling.get("bf16_tflops") else "not measured (no CUDA)")
        + (f", FP8 {ceiling['fp8_tflops']:.0f} TFLOP/s" if ceiling.get("fp8_tflops") else ""),
        "",
        "| row | profile | ms / step | vs default | s / image | warm-up s | TFLOP/s | % bf16 GEMM | peak GiB "
        "| PSNR dB | SSIM |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "step_ms" not in row:
            reason = row.get("skipped") or row.get("failed")
            lines.append(f"| {row['label']} | {row['describe']} | {'skipped' if 'skipped' in row else 'failed'}: "
                         f"{reason} | | | | | | | | |")
            continue
        label = row["label"] + ("" if row.get("kept", True) else " (not kept)")
        speedup = f"{default['step_ms'] / row['step_ms']:.2f}x" if default else ""
        lines.append(
            f"| {label} | {row['describe']} | {row['step_ms']:.1f} | {speedup} | {row['s_per_image']:.2f} "
            f"| {row['warmup_s']:.1f} | {row['tflops']:.3g} | {_pct(row.get('pct_of_bf16_gemm'))} "
            f"| {_num(row.get('peak_memory_gib'))} | {_db(row['psnr_db'])} | {row['ssim']:.4f} |")
    tier_rows = document.get("tiers") or {}
    if tier_rows:
        lines += ["", "| tier | fastest row | ms / step | vs default | s / image | PSNR dB |",
                  "|---|---|---|---|---|---|"]
        for name, tier in tier_rows.items():
            if tier is None:
                lines.append(f"| {name} | none measured | | | | |")
            else:
                lines.append(f"| {name} | {tier['describe']} | {tier['step_ms']:.1f} | {tier['speedup']:.2f}x "
                             f"| {tier['s_per_image']:.2f} | {_db(tier['psnr_db'])} |")
    broken_down = [r for r in rows if "breakdown" in r]
    if broken_down:
        lines += ["", "One step by kernel kind (torch.profiler, ms):", "",
                  "| row | step | " + " | ".join(KINDS) + " | idle |", "|---|---|" + "---|" * (len(KINDS) + 1)]
        for row in broken_down:
            b = row["breakdown"]
            lines.append(f"| {row['label']} | {row['step_ms']:.1f} | "
                         + " | ".join(f"{b['kernel_ms'][k]:.1f}" for k in KINDS) + f" | {b['idle_ms']:.1f} |")
    stepped = [r for r in rows if "removed_ms" in r]
    if stepped:
        lines += ["", "What each stack step removed from one step, against the stack it was tried on (ms; negative: "
                      "it added time there):", "",
                  "| step | tried on | " + " | ".join(KINDS) + " | idle | kept |",
                  "|---|---|" + "---|" * (len(KINDS) + 2)]
        labels = {r["id"]: r["label"] for r in rows}
        for row in stepped:
            removed = row["removed_ms"]
            lines.append(f"| {row['label']} | {labels.get(row['stack_base'], row['stack_base'])} | "
                         + " | ".join(f"{removed[k]:.1f}" for k in (*KINDS, "idle"))
                         + f" | {'yes' if row.get('kept') else 'no'} |")
    changed = [r for r in stepped if r.get("kernel_changes", {}).get("gone") or r.get("kernel_changes", {}).get("new")]
    if changed:
        lines += ["", f"Kernels each stack step took away and brought, by name (the {KERNEL_CHANGES} heaviest each way "
                      f"among the {TOP_KERNELS} heaviest of a step; ms per step):", "",
                  "| step | gone | new |", "|---|---|---|"]
        for row in changed:
            cells = [", ".join(f"`{k['name'][:60]}` {k['ms']:.1f}" for k in row["kernel_changes"][way]) or "none"
                     for way in ("gone", "new")]
            lines.append(f"| {row['label']} | {cells[0]} | {cells[1]} |")
    if document.get("flops_per_step"):
        f = document["flops_per_step"]
        lines += ["", f"FLOPs per step: {f['total'] / 1e12:.4g} T (linear {f['linear'] / 1e12:.4g}, attention "
                      f"{f['attention'] / 1e12:.4g})."]
        if "image_tokens" in f:  # an edit: the sequence read from the transformer's first call
            lines.append(f"Sequence per pass: {f['image_tokens']:.0f} image tokens (the output's and the inputs' "
                         f"latents) + {f['text_tokens']:.0f} text tokens (the prompt with the vision tower's).")
    lines += [f"Note: {note}." for note in document.get("notes", [])]
    return "\n".join(lines) + "\n"


def _task(workload: dict[str, Any]) -> str:
    task = workload.get("task", "generate")
    return "" if task == "generate" else f"{task} "


def _pct(value) -> str:
    return "" if value is None else f"{value:.0f}%"


def _num(value) -> str:
    return "" if value is None else f"{value:.1f}"


def _finite(value):
    """JSON has no infinity: an exact match (PSNR inf) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
