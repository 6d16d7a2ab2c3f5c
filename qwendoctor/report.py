"""What tune shows a person (rich progress and tables) and a machine (--json)."""

from __future__ import annotations

import json
import math
import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from qwendoctor import runner
from qwendoctor.tune import TuneOptions, TuneResult, run_tune


def run_tune_with_progress(options: TuneOptions, as_json: bool = False) -> TuneResult:
    # Progress goes to stderr so `--json` output on stdout stays parseable.
    console = Console(stderr=True)
    quiet = as_json or not console.is_terminal
    if quiet:
        def log(message: str) -> None:
            print(f"qwendoctor: {message}", file=sys.stderr, flush=True)

        def on_trial(row, done, total) -> None:
            log(f"trial {done}/{total}: {_trial_line(row)}")

        return run_tune(options, log=log, on_trial=on_trial)

    with Progress(TextColumn("[bold]{task.fields[label]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.description}"), console=console,
                  transient=False) as progress:
        task = progress.add_task("starting", total=options.trials, label="tune")
        # The denoising steps of the render under way (reference, trial, check): minutes on a big model.
        steps = progress.add_task("", total=None, label="steps", visible=False)

        def log(message: str) -> None:
            progress.console.print(f"[dim]{escape(message)}[/dim]")
            progress.update(steps, description=escape(message.split(":")[0]))

        def on_trial(row, done, total) -> None:
            progress.update(task, completed=min(done, total), description=escape(_trial_line(row)))

        def on_step(step: int, total: int) -> None:
            if step == 1:
                progress.reset(steps, total=total, visible=True)
            progress.update(steps, completed=step)

        with runner.on_each_step(on_step):
            return run_tune(options, log=log, on_trial=on_trial)


def _fmt(value, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "exact"
    return f"{value:.{digits}g}{unit}"


def _trial_line(row) -> str:
    if row["state"] == "infeasible" and row.get("failure"):  # out of memory: it ran, and needs more than allowed
        peak = f" after a peak of {row['peak_memory_gib']:.1f} GiB" if row.get("peak_memory_gib") else ""
        return f"#{row['number']} {row['profile']}: infeasible, {row['failure']}{peak}"
    if row["state"] == "failed":
        return f"#{row['number']} {row['profile']}: failed ({row['failure']})"
    if row["state"] == "slower":
        return (f"#{row['number']} {row['profile']}: {_fmt(row.get('step_ms'), ' ms', 4)} per step, about "
                f"{_fmt(row.get('estimate_s'), ' s')} per image: slower than the best, not rendered")
    return (f"#{row['number']} {row['profile']}: {_fmt(row.get('latency_median_s'), ' s')} per image, "
            f"PSNR {_fmt(row.get('psnr_db'), ' dB')}, SSIM {_fmt(row.get('ssim'))}"
            + (f", LPIPS {_fmt(row['lpips'])}" if row.get("lpips") is not None else "")
            + (f", {row['cached_fraction']:.0%} of steps cached" if row.get("cached_fraction") is not None else "")
            + (" (below floor)" if row["state"] == "infeasible" else ""))


def print_tune(result: TuneResult, lock_path: str, console: Console | None = None) -> None:
    console = console or Console()
    lock = result.lock
    summary = Table(title="baseline vs best", show_lines=False)
    for column in ("", "s / image", "ms / step", "peak GiB", "PSNR dB", "SSIM"):
        summary.add_column(column, justify="right" if column else "left")
    for label, values in (("default", lock.baseline), ("best: " + lock.profile.describe(), lock.measured)):
        summary.add_row(label, _fmt(values.get("latency_median_s")), _fmt(values.get("step_ms"), digits=4),
                        _fmt(values.get("peak_memory_gib")), _fmt(values.get("psnr_db", math.inf)),
                        _fmt(values.get("ssim", 1.0)))
    console.print(summary)

    top = Table(title="top trials")
    for column in ("#", "profile", "s / image", "PSNR dB", "SSIM", "state"):
        top.add_column(column)
    for row in top_trials(result.trials):
        seconds = (_fmt(row.get("latency_median_s")) if row.get("latency_median_s") is not None
                   else f"~{_fmt(row.get('estimate_s'))}")  # an estimate from timed steps: never rendered
        top.add_row(str(row["number"]), row["profile"], seconds,
                    _fmt(row.get("psnr_db")), _fmt(row.get("ssim")), row["failure"] or row["state"])
    console.print(top)
    if result.strategy_rows:
        split = Table(title="multi-GPU: the best profile split over GPUs")
        for column in ("strategy", "GPUs", "ms / step", "s / image", "PSNR dB", "note"):
            split.add_column(column)
        for row in result.strategy_rows:
            split.add_row(row["strategy"], str(row["gpus"]), _fmt(row.get("step_ms"), digits=4),
                          _fmt(row.get("latency_median_s")), _fmt(row.get("psnr_db")), row["failure"] or "")
        console.print(split)
    counts = result.counts
    out_of_memory = counts.get("out_of_memory", 0)
    console.print(f"{counts['trials']} trials, each a distinct profile: {counts['completed']} feasible, "
                  f"{counts['infeasible'] - out_of_memory} below the floor, "
                  + (f"{out_of_memory} out of memory, " if out_of_memory else "")
                  + f"{counts.get('slower', 0)} slower than the best (timed, not rendered), {counts['failed']} failed"
                  + (f"; {counts['duplicates']} repeated proposals reused their measurement, not counted"
                     if counts.get("duplicates") else "") + ".")
    console.print(time_line(result))
    for note in result.notes:
        console.print(note)
    console.print(speedup_line(lock))
    confirmed = confirmation_line(lock)
    if confirmed:
        console.print(confirmed)
    fixed = fixed_cache_line(lock)
    if fixed:
        console.print(fixed)
    console.print(f"lock written to {lock_path}" + (f", plot to {result.plot_path}" if result.plot_path else ""))


QUALITY_NOTES = {
    "lossless": "lossless: rounding only, measured against the default's images",
    "verified": "lossy, judged against the default's images on a model that draws",
    "unverified": "lossy and unverified: {model} has random weights, so its PSNR/SSIM speak for numerical fidelity "
                  "only",
}


def speedup_line(lock) -> str:
    """The headline, with how far it can be trusted. A lossy one stands beside the lossless figure of the same
    study; an unverified one never leads: its quality was measured on noise."""
    study = lock.study
    quality = study.get("quality")
    figure = f"{lock.measured['speedup']:.2f}x"
    if quality is None:
        return f"speedup {figure} over the default"
    note = QUALITY_NOTES[quality].format(model=lock.workload.model)
    if quality == "unverified" and "lossless_speedup" in study:
        return (f"speedup {study['lossless_speedup']:.2f}x over the default, lossless (trial "
                f"#{study['lossless_trial']}); the locked profile's {figure} is {note}")
    line = f"speedup {figure} over the {base_default(lock)} ({note})"
    if quality != "lossless" and "lossless_speedup" in study:
        line += f"; lossless {study['lossless_speedup']:.2f}x (trial #{study['lossless_trial']})"
    return line + held_out_note(study) + confirmation_note(lock)


def base_default(lock) -> str:
    """What the headline's "default" is. For a lock that runs a distilled adapter, say plainly that the figure is
    against the base model as diffusers runs it, not against the adapter's own few steps run slowly."""
    if not lock.profile.distilled:
        return "default"
    workload = lock.workload
    cfg = f"true CFG {workload.true_cfg_scale:g}" if workload.does_cfg else "CFG off"
    return (f"base model's default ({workload.reference_steps} steps, {cfg}, without the distilled adapter; the "
            f"lock runs it at {lock.profile.steps} steps, CFG off)")


def confirmation_note(lock) -> str:
    """What the headline rests on: the side-by-side confirmation (the headline itself), whether this machine's
    timings could rank at all, and the faster profiles it measured slower than the default."""
    from qwendoctor.tune import UNSTABLE_SPREAD

    measured, study = lock.measured, lock.study
    note = ""
    if "confirmed_speedup" in measured and measured.get("confirmed_spread", 0) > UNSTABLE_SPREAD:
        note += "; cannot rank: the side-by-side timings varied too much to confirm it"
    if study.get("confirm_rejected"):
        note += (f"; {study['confirm_rejected']} faster profile(s) measured slower than the default side by side, "
                 "not locked")
    return note


def confirmation_line(lock) -> str | None:
    """The locked profile against the default, re-timed side by side after the study (qwendoctor.tune)."""
    from qwendoctor.tune import UNSTABLE_SPREAD

    measured = lock.measured
    if "confirmed_speedup" not in measured:
        return None
    rounds = lock.study.get("confirm_rounds", "several")
    spread = measured["confirmed_spread"]
    if spread > UNSTABLE_SPREAD:
        return (f"not confirmed: re-timed against the default in {rounds} rounds, the ratio varied by "
                f"+/-{spread:.0%} ({measured['confirmed_speedup']:.2f}x at the median); timings here are too "
                "unstable to rank profiles: tune again on a quieter machine")
    study_figure = (f"; the study's own estimate, timed apart, was {measured['study_speedup']:.2f}x"
                    if "study_speedup" in measured else "")
    return (f"confirmed {measured['confirmed_speedup']:.2f}x: the locked profile against the default, re-timed side "
            f"by side in {rounds} rounds, +/-{spread:.0%}{study_figure}")


def fixed_cache_line(lock) -> str | None:
    """Caches timed on a fixed schedule where quality cannot judge them: a speed, never a headline."""
    figures = [(share, lock.study[f"fixed_cache_{share}_speedup"]) for share in (50, 70)
               if f"fixed_cache_{share}_speedup" in lock.study]
    if not figures:
        return None
    return ("caches, speed only (unverified: a fixed schedule on random weights, not in the lock): "
            + ", ".join(f"{share}% of steps cached {speedup:.2f}x" for share, speedup in figures)
            + " over the default")


def held_out_note(study: dict) -> str:
    if "held_out_images" not in study:
        return ""
    if not study["held_out_images"]:
        return "; no held-out check: the study used every built-in prompt, none was left to hold out"
    rejected = study.get("held_out_rejected", 0)
    skipped = f"; {rejected} faster trial(s) missed the floor there" if rejected else ""
    if "held_out_psnr_db" not in study:
        return f"; held-out check on {study['held_out_images']} new image(s): no lossy trial held{skipped}"
    return (f"; held out ({study['held_out_images']} new prompt/seed images): PSNR {study['held_out_psnr_db']:.1f} "
            f"dB, SSIM {study['held_out_ssim']:.3f}{skipped}")


TIME_LABELS = {"build": "load, restore and apply levers", "warmup": "warm-up (compile, autotune)",
               "speed": "timed steps", "render": "full renders", "quality": "PSNR/SSIM"}


def time_line(result: TuneResult) -> str:
    """Where the time went: this run's wall clock, then the study's trials by part."""
    wall = ", ".join(f"{k} {v:.1f} s" for k, v in result.time_spent_s.items())
    parts = ", ".join(f"{TIME_LABELS.get(k, k)} {v:.1f} s" for k, v in result.trial_time_s.items())
    return f"Time: this run {wall}." + (f" The study's trials: {parts}." if parts else "")


def top_trials(rows: list[dict], count: int = 5) -> list[dict]:
    """Fastest feasible first, then the rest; each profile once (TPE re-proposes profiles it has measured,
    and their numbers are reused, so the same row would otherwise fill the table)."""
    ranked = sorted(rows, key=lambda r: (r["state"] != "complete",
                                         r.get("latency_median_s", r.get("estimate_s", math.inf))))
    seen, result = set(), []
    for row in ranked:
        if row["profile"] not in seen:
            seen.add(row["profile"])
            result.append(row)
    return result[:count]


def tune_json(result: TuneResult) -> str:
    lock = result.lock

    def clean(value):
        return None if isinstance(value, float) and math.isinf(value) else value

    return json.dumps({
        "profile": lock.profile.to_dict(),
        "measured": {k: clean(v) for k, v in lock.measured.items()},
        "baseline": {k: clean(v) for k, v in lock.baseline.items()},
        "study": lock.study,
        # What "speedup" is measured against (the baseline's profile: the base model as diffusers runs it).
        "speedup_against": base_default(lock),
        "counts": result.counts,
        "time_spent_s": result.time_spent_s,
        "trial_time_s": result.trial_time_s,
        "strategies": [{k: clean(v) for k, v in row.items()} for row in result.strategy_rows],
        "notes": result.notes,
        "plot": result.plot_path,
        "trials": [{k: clean(v) for k, v in row.items()} for row in result.trials],
    }, indent=2)
