"""tune's multi-GPU stage: the study's best one-GPU profile, run with each strategy that uses the GPUs asked for.

The strategies (qwendoctor.parallel) split the work the one-GPU levers leave, so they compose with them: the TPE
study searches the levers on one GPU, where a trial costs one GPU, and this stage then measures the winner under
each strategy, each in its own torchrun launch (a strategy that fails, say ring without a log-sum-exp backend,
is recorded and the next one runs). In every launch all ranks build the model, apply the profile, warm up,
time a few steps and render the first prompt and seed in full; rank 0 writes the timings and the image. The
fastest strategy whose image meets the floor against the reference, and beats one GPU, goes into the lock.

    python -m qwendoctor.strategies --rank JOB.json   (what torchrun starts in each rank; not for people)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable

from probes.context import exc_line
from qwendoctor import files, parallel, quality
from qwendoctor.capabilities import detect_capabilities
from qwendoctor.errors import QwendoctorError
from qwendoctor.profile import Profile, Workload, check_runnable


def gpu_counts(gpus: int) -> list[int]:
    """The GPU counts worth a launch up to `gpus`: powers of two, and `gpus` itself. Fewer GPUs can be faster
    (on four H100s CFG-parallel on two beat cfg+ulysses on four: benchmarks/multigpu)."""
    counts = [n for n in (2, 4, 8, 16) if n < gpus]
    return counts + [gpus] if gpus >= 2 else []


def strategies_for(gpus: int, does_cfg: bool) -> list[str]:
    """The strategies that use all `gpus`."""
    if gpus < 2:
        return []
    found = []
    if does_cfg and gpus == 2:
        found.append("cfg")
    if does_cfg and gpus >= 4 and gpus % 2 == 0:
        found += ["cfg+ulysses", "cfg+ring"]
    return found + ["ulysses", "ring"]


@dataclasses.dataclass
class StrategyRow:
    strategy: str
    gpus: int
    profile: Profile
    failure: str | None = None
    results: dict[str, Any] = dataclasses.field(default_factory=dict)  # step_ms, latency_median_s, psnr_db, ...

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "gpus": self.gpus, "profile": self.profile.describe(),
                "failure": self.failure,
                **self.results}


def measure_strategies(best: Profile, workload: Workload, gpus: int, prompt: str, seed: int, reference_image,
                       timed_steps: int, log: Callable[[str], None]) -> list[StrategyRow]:
    """Each strategy on each GPU count up to `gpus` with `best`'s levers: timed steps, one full image, its
    PSNR/SSIM against the reference image of the same prompt and seed."""
    rows = []
    work = tempfile.mkdtemp(prefix="qwendoctor-strategies-")
    for count in gpu_counts(gpus):
        for strategy in strategies_for(count, workload.does_cfg):
            rows.append(_measure_one(best, workload, count, strategy, prompt, seed, reference_image, timed_steps,
                                     work, log))
    return rows


def _measure_one(best: Profile, workload: Workload, gpus: int, strategy: str, prompt: str, seed: int,
                 reference_image, timed_steps: int, work: str, log: Callable[[str], None]) -> StrategyRow:
    import numpy as np


    try:
        profile = parallel.with_gpus(best, gpus, strategy, workload.does_cfg)
        # Refused here in a second (a backend the strategy cannot split), not after a launch.
        check_runnable(profile, workload, detect_capabilities())
    except QwendoctorError as error:  # a lever of `best` this strategy cannot take
        log(f"multi-GPU: {strategy} on {gpus}: not possible with this profile ({error})")
        return StrategyRow(strategy, gpus, best, failure=str(error))
    row = StrategyRow(strategy, gpus, profile)
    job = os.path.join(work, f"{strategy.replace('+', '-')}-{gpus}.json")
    with open(job, "w", encoding="utf-8") as handle:
        json.dump({"profile": profile.to_dict(), "workload": workload.identity(), "prompt": prompt, "seed": seed,
                   "timed_steps": timed_steps, "out": job + ".result"}, handle)
    started = time.perf_counter()
    try:
        parallel.launch(gpus, ["qwendoctor.strategies", "--rank", job])
        with open(job + ".result", encoding="utf-8") as handle:
            row.results = json.load(handle)
        image = np.load(job + ".result.npy")
        row.results.update(quality.compare([image], [reference_image]))
    except QwendoctorError as error:
        row.failure = str(error)
    row.results["wall_s"] = time.perf_counter() - started
    log(f"multi-GPU: {strategy} on {gpus}: " + (f"failed ({row.failure})" if row.failure else
        f"{row.results['step_ms']:.1f} ms per step, {row.results['latency_median_s']:.3g} s per image, "
        f"PSNR {row.results['psnr_db']:.1f} dB"))
    return row


def fastest(rows: list[StrategyRow], floor: quality.Floor, one_gpu_s: float) -> StrategyRow | None:
    """The fastest strategy that meets the floor and beats the one-GPU profile; None if none does."""
    good = [r for r in rows if r.failure is None
            and all(v <= 0 for v in floor.violations(r.results).values())
            and r.results["latency_median_s"] < one_gpu_s]
    return min(good, key=lambda r: r.results["latency_median_s"], default=None)


def run_rank(job_path: str) -> None:
    """One rank of one strategy's launch."""
    import numpy as np

    from probes import timing
    from qwendoctor import models, runner

    with open(job_path, encoding="utf-8") as handle:
        job = json.load(handle)
    profile = Profile.from_dict(job["profile"])
    workload = Workload.from_identity(job["workload"])
    device = models.default_device()
    parallel.init_process_group(device)
    try:
        model = runner.build(workload, profile, detect_capabilities())
        speed = runner.time_steps(model, workload, profile, job["prompt"], job["seed"], job["timed_steps"])
        clock = timing.StepClock(model.device)
        clock.start()
        image = runner.render(model, workload, profile, job["prompt"], job["seed"], clock=clock)
        timing.synchronize(model.device)
        latency_s = time.perf_counter() - clock.stamps[0]
        if parallel.is_main():
            np.save(job["out"] + ".npy", image)
            results = {"step_ms": 1000 * speed.step_median_s, "warmup_s": speed.warmup_s,
                       "latency_median_s": latency_s}
            if speed.peak_memory_gib is not None:
                results["peak_memory_gib"] = speed.peak_memory_gib
            files.write_text_atomic(job["out"], json.dumps(results))
    finally:
        parallel.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", required=True, help="the job file tune wrote")
    args = parser.parse_args(argv)
    try:
        run_rank(args.rank)
    except Exception as error:  # the launcher raises it as this strategy's failure
        parallel.report_failure(exc_line(error), 1)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
