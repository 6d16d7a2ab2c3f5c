"""Multi-GPU generation on this host (issue 7): ms/step of the tuned one-GPU profile against each multi-GPU
strategy with the same levers, and each strategy's image against the one-GPU image for the same seed (PSNR).

    python3 benchmarks/tools/multigpu_bench.py [--profile k=v,...] [--model synthetic] [--width 1328] [--height 1328]
        [--steps 50] [--timed-steps 6] [--gpus N] [--strategies cfg,ulysses,...] [--out DIR]

This process only coordinates: each row is one torchrun launch (qwendoctor.parallel.launch) of this module with
--row, so a row that fails (OOM, a compile error, a collective timing out) is recorded with its rank's error and
the next row starts on fresh processes. In a row every rank builds the model itself (synthetic: seeded random
weights made on its GPU; a checksum all-gathered after the build confirms the ranks hold the same weights),
applies the profile, renders a 2-step warm-up (compile, autotune), then --timed-steps steps with a
device-synchronised clock per step; rank 0 writes the row. CFG batching gives way to CFG-parallel in the cfg
strategies (qwendoctor.parallel.with_gpus).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

PROMPT = "A red fox sitting in fresh snow at dawn, golden light, shallow depth of field"
SEED = 0
DEFAULT_PROFILE = "attention_backend=_native_cudnn,compile=regional,cfg_batching=true"
TARGETS = {2: 1.85, 4: 3.2}  # issue 7: speedup over the tuned one-GPU profile on the same host


def profile_text(profile) -> str:
    return ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in profile.to_dict().items())


def workload(args):
    from qwendoctor import models
    from qwendoctor.profile import Workload

    return Workload(model=args.model, width=args.width, height=args.height, reference_steps=args.steps,
                    true_cfg_scale=args.true_cfg_scale,
                    dtype=models.default_dtype(models.default_device())).validate()


# ---- one row, in every rank ----------------------------------------------------------------------------------

def weights_agree(transformer) -> bool:
    """The same seeded weights on every rank: a few parameters' sums, all-gathered and compared exactly."""
    import torch
    import torch.distributed as dist

    params = list(transformer.parameters())
    checksum = torch.stack([params[i].detach().float().sum() for i in (0, len(params) // 2, -1)])
    if not dist.is_initialized():
        return True
    gathered = [torch.empty_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def run_row(args) -> None:
    import numpy as np

    from probes import timing
    from qwendoctor import models, parallel, runner
    from qwendoctor.capabilities import detect_capabilities
    from qwendoctor.levers import optimize
    from qwendoctor.profile import Profile, check_runnable

    profile = Profile.from_text(args.row_profile)
    work = workload(args)
    device = models.default_device()
    if profile.gpus > 1:
        parallel.init_process_group(device)
    check_runnable(profile, work, detect_capabilities())
    started = time.perf_counter()
    model = models.load_model(work.model, device, work.dtype)
    agree = weights_agree(model.pipe.transformer)
    optimize(model.pipe, profile)
    build_s = time.perf_counter() - started
    timed = dataclasses.replace(profile, steps=args.timed_steps)
    measurement = runner.measure(model, work, timed, [PROMPT], [SEED], warmup=1)
    if parallel.is_main():
        step_ms = [1000 * s for s in measurement.step_s]
        row = {"profile": profile.to_dict(), "describe": profile.describe(), "gpus": profile.gpus,
               "parallel": profile.parallel, "step_ms": statistics.median(step_ms), "steps_ms": step_ms,
               "warmup_s": measurement.warmup_s, "build_s": build_s, "weights_agree": agree,
               "peak_memory_gib": measurement.peak_memory_gib}
        np.save(os.path.join(args.work, f"row-{args.row}.npy"), measurement.images[0])
        with open(os.path.join(args.work, f"row-{args.row}.json"), "w", encoding="utf-8") as handle:
            json.dump(row, handle)
    del model
    timing.synchronize(device)
    if profile.gpus > 1:
        parallel.destroy_process_group()


# ---- the coordinator --------------------------------------------------------------------------------------------

def coordinate(args) -> dict:
    import numpy as np

    from qwendoctor import parallel, quality
    from qwendoctor.capabilities import detect_capabilities
    from qwendoctor.errors import QwendoctorError
    from qwendoctor.profile import Profile, check_runnable
    from qwendoctor.strategies import strategies_for

    gpus = args.gpus or _visible_gpus()
    work = workload(args)
    tuned = Profile.from_text(args.profile)
    wanted = [s for s in (args.strategies.split(",") if args.strategies else strategies_for(gpus, work.does_cfg))]
    rows = [("1 GPU (tuned)", tuned)] + [(s, parallel.with_gpus(tuned, gpus, s, work.does_cfg)) for s in wanted]
    args.work = os.path.join(tempfile.gettempdir(), "qwendoctor-multigpu")  # the images stay out of --out
    os.makedirs(args.work, exist_ok=True)
    document = {"workload": work.to_dict(), "gpus": gpus, "timed_steps": args.timed_steps, "tuned": tuned.to_dict(),
                "command": " ".join(sys.argv), "host": _host(), "rows": []}
    reference = None
    capabilities = detect_capabilities()
    try:
        for index, (label, profile) in enumerate(rows):
            print(f"multigpu: row {index} {label}: {profile.describe()}", file=sys.stderr, flush=True)
            row = {"label": label, "gpus": profile.gpus, "profile": profile.to_dict()}
            started = time.perf_counter()
            try:
                # Refused here in a second (a backend ring cannot split), not after a launch. The full capabilities:
                # FP8 profiles need the compute capability (it creates a CUDA context here, which costs memory
                # on GPU 0 only).
                check_runnable(profile, work, capabilities)
                parallel.launch(profile.gpus, [
                    "benchmarks.tools.multigpu_bench", "--row", str(index), "--row-profile", profile_text(profile),
                    "--work", args.work, "--model", args.model, "--width", str(args.width), "--height",
                    str(args.height), "--steps", str(args.steps), "--timed-steps", str(args.timed_steps),
                    "--true-cfg-scale", str(args.true_cfg_scale)],
                    echo=lambda line: print(line, file=sys.stderr, flush=True))
                with open(os.path.join(args.work, f"row-{index}.json"), encoding="utf-8") as handle:
                    row.update(json.load(handle))
                image = np.load(os.path.join(args.work, f"row-{index}.npy"))
                if index == 0:
                    reference = image
                if reference is not None:
                    row["psnr_db"] = quality.compare([image], [reference])["psnr_db"]
                base = document["rows"][0].get("step_ms") if document["rows"] else row["step_ms"]
                if base:
                    row["speedup"] = base / row["step_ms"]
            except QwendoctorError as error:
                row["failed"] = str(error)
            row["wall_s"] = time.perf_counter() - started
            document["rows"].append(row)
            _write(args.out, document)
    except KeyboardInterrupt:
        document["interrupted"] = True
        _write(args.out, document)
    return document


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _host() -> dict:
    import torch

    host = {"torch": torch.__version__}
    if torch.cuda.is_available():
        host.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count())
    return host


def markdown(document: dict) -> str:
    work = document["workload"]
    lines = [f"Multi-GPU generation, {work['model']} {work['width']}x{work['height']}, true CFG "
             f"{work['true_cfg_scale']:g}, {document['gpus']} visible GPU(s) ({document['host'].get('gpu', 'CPU')}); "
             f"median of {document['timed_steps']} device-synchronised steps after a 2-step warm-up",
             "",
             f"| row | GPUs | profile | ms / step | speedup | s / image ({work['reference_steps']} steps) | "
             "PSNR vs 1 GPU | warm-up s | peak GiB | same weights |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in document["rows"]:
        if "failed" in row:
            lines.append(f"| {row['label']} | {row['gpus']} | | failed: {row['failed'][:160]} | | | | | | |")
            continue
        psnr = row.get("psnr_db")
        lines.append(
            f"| {row['label']} | {row['gpus']} | {row['describe']} | {row['step_ms']:.1f} | "
            f"{row.get('speedup', float('nan')):.2f}x | {row['step_ms'] * work['reference_steps'] / 1000:.1f} | "
            f"{'ref' if row is document['rows'][0] else ('inf' if psnr == float('inf') else f'{psnr:.1f} dB')} | "
            f"{row['warmup_s']:.1f} | {_gib(row.get('peak_memory_gib'))} | {'yes' if row['weights_agree'] else 'NO'} |")
    target = TARGETS.get(document["gpus"])
    best = max((r.get("speedup", 0) for r in document["rows"][1:] if "failed" not in r), default=None)
    if target and best is not None and "gpu" in document["host"]:  # the targets are for GPUs
        lines += ["", f"target at {document['gpus']} GPUs: >= {target}x; best measured: {best:.2f}x "
                      f"({'met' if best >= target else 'not met'})"]
    if document.get("interrupted"):
        lines += ["", "interrupted: the rows above are all that ran"]
    return "\n".join(lines)


def _gib(value) -> str:
    return "" if value is None else f"{value:.1f}"


def _write(out: str, document: dict) -> None:
    for name, text in (("multigpu.json", json.dumps(document, indent=2, default=str)),
                       ("multigpu.md", markdown(document) + "\n")):
        with open(os.path.join(out, name + ".tmp"), "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help="the tuned one-GPU profile, k=v,...")
    parser.add_argument("--model", default=None, help="[synthetic on CUDA, tiny on the CPU]")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int, default=50, help="steps of a full image (for s / image)")
    parser.add_argument("--timed-steps", type=int, default=6)
    parser.add_argument("--true-cfg-scale", type=float, default=4.0)
    parser.add_argument("--gpus", type=int, help="ranks for the multi-GPU rows [all visible GPUs]")
    parser.add_argument("--strategies", help="comma-separated [every strategy that uses all the GPUs]")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    parser.add_argument("--row", type=int, help=argparse.SUPPRESS)  # set by the coordinator for a rank
    parser.add_argument("--row-profile", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = _cuda()
    args.model = args.model or ("synthetic" if cuda else "tiny")
    size = 1328 if args.model != "tiny" else 128
    args.width, args.height = args.width or size, args.height or size
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    from qwendoctor import parallel

    args = parse(sys.argv[1:] if argv is None else argv)
    if args.row is not None:
        try:
            run_row(args)
        except Exception as error:  # the coordinator reports it as this row's result
            message = (str(error).strip().splitlines() or [""])[0][:300]
            parallel.report_failure(f"{type(error).__name__}: {message}", 1)
            raise
        return 0
    os.makedirs(args.out, exist_ok=True)
    document = coordinate(args)
    print(markdown(document), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
