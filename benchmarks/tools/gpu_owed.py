"""Everything owed to a GPU, in order of value, in whatever minutes a lent machine gives (issue 28).

GPU time here comes in calls of at most ten minutes, often after a long wait, and a machine keeps nothing between
sessions. So this runner takes the owed tasks in a fixed order of value, skips every task the committed ledger
(`benchmarks/gpu-owed/ledger.jsonl`) already records as done on this card kind, starts a task only when the
seconds left cover its budget, writes each outcome to `$OUT/ledger.jsonl` the moment it lands, and packs the
tasks' logs and results into `$OUT/results.tgz` after each one (a call returns at most eight files). Appending the returned
rows to the committed ledger is what makes the next call resume where this one stopped:

    python3 benchmarks/tools/gpu_owed.py --seconds 540 --out $OUT        # on the device machine
    python3 benchmarks/tools/gpu_owed.py --merge /work/.device/N/ledger.jsonl   # here, afterwards
    python3 benchmarks/tools/gpu_owed.py --list                          # what is owed, and what is done

A task is done on a card kind (H100, H200) when it exited 0 there; a failed or timed-out task stays owed and its
row says why. `--only ID` runs the named tasks whatever the ledger says.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LEDGER = ROOT / "benchmarks" / "gpu-owed" / "ledger.jsonl"
CLI = [sys.executable, "-m", "qwendoctor"]


@dataclasses.dataclass(frozen=True)
class Task:
    id: str
    why: str  # what the result settles
    argv: tuple[str, ...]
    budget_s: int  # the wall time it is given (and must be left to start it)


def _gpu_test(name: str, budget_s: int, why: str) -> Task:
    return Task(f"test:{name}", why, (sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                                      f"tests/gpu/{name}.py"), budget_s)


def _bench(task_id: str, why: str, budget_s: int, *args: str) -> Task:
    return Task(task_id, why, (*CLI, "bench", "--model", "synthetic", "--out", "{work}/bench", "--resume", *args),
                budget_s)


LOSSLESS = "compile=regional,real_rope=true,cfg_batching=true"
# Issue 29's edit at 1024x1024: the output's 4096 image tokens, the input's 4096 and about 1,380 text tokens (the
# vision tower's 1,369 among them) a pass, against 4096 + ~10 for text-to-image. Whole images (--full-image: s /
# image end to end, the vision tower and VAE encode included), the default against the lossless stack, its FP8
# tier and a cache. The cache runs a fixed schedule (half the steps reuse), not a threshold: on random weights a
# threshold's verdicts say nothing, a fixed schedule costs what it costs on any weights. Then text-to-image at the
# same output size with the same profiles, on the same machine, for the ratios between the two.
EDIT_PROFILES = ("--profile", LOSSLESS, "--profile", LOSSLESS + ",quantization=fp8_rowwise",
                 "--profile", LOSSLESS + ",cache=dbcache,cache_schedule=0.5")
EDIT_1024 = ("--width", "1024", "--height", "1024", "--full-image", "--no-ladder", *EDIT_PROFILES)
# Highest value first: what a user's FP8 run depends on, then the regression net, then the per-step goals, then
# the memory plan's rows and the 8-bit attention build.
TASKS = (
    _gpu_test("test_fp8_synthetic_gpu", 120, "FP8 row-wise on the full-width blocks at a real prompt length"),
    Task("fp8:pipeline-1024", "the FP8 fix and CFG batching without a mask, on the 20B pipeline at 1024x1024",
         (sys.executable, "benchmarks/tools/fp8_diagnose.py", "--out", "{work}/fp8", "--skip-kernels", "--variants",
          "as_is:;as_is:quantization=fp8_rowwise,compile=regional,real_rope=true;as_is:compile=regional,"
          "real_rope=true;as_is:" + LOSSLESS + ";txt_bf16:quantization=fp8_rowwise,compile=regional,"
          "real_rope=true"), 480),
    # The FP8 lever's text-stream choice (quantization_text_stream), which fp8:pipeline-1024 measured by hand
    # (its txt_bf16 row): the test, then both choices through the lever, on one machine.
    _gpu_test("test_fp8_text_stream_gpu", 120, "FP8 row-wise with the text stream in bf16, through the lever"),
    Task("fp8:text-stream-1024", "the FP8 lever's two text-stream choices on the 20B pipeline at 1024x1024, "
         "regional compile, against the default",
         (sys.executable, "benchmarks/tools/fp8_diagnose.py", "--out", "{work}/fp8-text-stream", "--skip-kernels",
          "--variants", "as_is:;as_is:quantization=fp8_rowwise,compile=regional,real_rope=true;"
          "as_is:quantization=fp8_rowwise,quantization_text_stream=bf16,compile=regional,real_rope=true"), 360),
    # Issue 27's GPU part: LoRAs held fused, unfused and hotswapped. The test first (tiny: cheap, and it says
    # whether the rows below can be trusted), then the 20B rows in two calls' worth (each writes its JSON after
    # every row, so a timeout keeps what landed).
    _gpu_test("test_lora_gpu", 200, "LoRAs on CUDA: fused draws the unfused image, a hotswap under regional "
              "compile compiles no new graph, FP8 after fusion keeps tiny's frame style"),
    Task("lora:compiled-1024", "what a fused, unfused and hotswapped LoRA (Lightning's rank 64, and 16) costs the "
         "20B transformer per step at 1024x1024 under regional compile, and the graphs a hotswap compiles",
         (sys.executable, "benchmarks/tools/lora_gpu.py", "--out", "{work}/lora-compiled", "--rows",
          "no_lora,fused,unfused,hotswap,unfused_user_rank"), 440),
    Task("lora:eager-1024", "what fused and unfused LoRAs cost the 20B transformer eager (tiny's FP8 after fusion "
         "ran in lora:compiled-1024's call)",
         (sys.executable, "benchmarks/tools/lora_gpu.py", "--out", "{work}/lora-eager", "--rows",
          "eager_no_lora,eager_unfused,eager_fused"), 380),
    _bench("bench:edit-1024", "issue 29: the edit pipeline at 1024x1024 (input latents and vision tokens in the "
           "sequence), whole images: the default, the lossless stack, its FP8 tier and a half-schedule cache, with "
           "the step breakdown", 560, "--task", "edit", "--name", "bench-synthetic-edit-1024x1024", *EDIT_1024),
    _bench("bench:t2i-1024-beside-edit", "issue 29: text-to-image at 1024x1024 with bench:edit-1024's profiles, on "
           "the same machine, for the ratios between the two", 420, "--name", "bench-synthetic-t2i-1024x1024",
           *EDIT_1024),
    _gpu_test("test_bench_gpu", 240, "CFG batching and real RoPE against two passes and eager"),
    _gpu_test("test_fp8_ends_gpu", 90, "FP8 with bf16 end blocks"),
    _gpu_test("test_fused_gpu", 150, "fused q/k/v keeps memory and image"),
    _gpu_test("test_gelu_epilogue_gpu", 150, "the GELU epilogue is cuBLASLt's gelubias kernel"),
    _gpu_test("test_cuda_graphs_gpu", 300, "CUDA graphs under a whole-transformer compile"),
    _gpu_test("test_gpu", 540, "the original lever tests"),
    _gpu_test("test_cache_gpu", 300, "caches with compile"),
    _gpu_test("test_contract_gpu", 300, "the pipeline contract on CUDA"),
    _gpu_test("test_check_gpu", 240, "the doctor on a GPU"),
    _gpu_test("test_memory_gpu", 400, "placements under memory limits"),
    _gpu_test("test_tune_gpu", 540, "tune on a GPU"),
    _bench("bench:1024", "the ladder at 1024x1024 with every row and the step breakdown", 560,
           "--width", "1024", "--height", "1024", "--timed-steps", "6"),
    _bench("bench:1328", "the ladder at 1328x1328 (W1)", 560, "--timed-steps", "6"),
    Task("memory:next-rows", "the memory plan's unmeasured placements",
         (sys.executable, "benchmarks/tools/memory_bench.py", "--out", "{work}/memory", "--rows",
          "benchmarks/h200/memory/next-rows.json"), 540),
    Task("tune:memory-32", "tune --memory-limit 32 at 1024x1024",
         (*CLI, "tune", "--model", "synthetic", "--width", "1024", "--height", "1024", "--memory-limit", "32",
          "--trials", "6", "--timeout", "420", "--lock", "{work}/tune-32.lock", "--storage",
          "sqlite:///{work}/tune-32.db", "--json"), 560),
    Task("tune:memory-48", "tune --memory-limit 48 at 1024x1024",
         (*CLI, "tune", "--model", "synthetic", "--width", "1024", "--height", "1024", "--memory-limit", "48",
          "--trials", "6", "--timeout", "420", "--lock", "{work}/tune-48.lock", "--storage",
          "sqlite:///{work}/tune-48.db", "--json"), 560),
    Task("sage2:build", "SageAttention 2 built from a carried checkout in .src/SageAttention",
         ("bash", "install_flash_attention.sh", "--which", "sage2", "--source", ".src/SageAttention"), 560),
    _gpu_test("test_attention_sage_gpu", 200, "SageAttention's attention and bench rows (needs sage2:build)"),
)


# GPU test files this one-GPU runner leaves out, and why.
NOT_OWED_HERE = {"test_parallel_gpu": "needs two or more GPUs of one host (benchmarks/tools/multigpu_run.sh)"}


def card_kind(name: str) -> str:
    """The ledger's key for a card: H100 and H200 timings never stand for each other."""
    for kind in ("H200", "H100"):
        if kind in name:
            return kind
    return name


def read_ledger(path: Path | None = None) -> list[dict]:
    path = path or LEDGER
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def owed(tasks, ledger: list[dict], kind: str) -> list[Task]:
    done = {row["id"] for row in ledger if row.get("card_kind") == kind and row.get("rc") == 0}
    return [task for task in tasks if task.id not in done]


def run_task(task: Task, work: Path, logs: Path, kind: str, card: str) -> dict:
    argv = [part.replace("{work}", str(work)) for part in task.argv]
    log = logs / (task.id.replace(":", "-") + ".log")
    started = time.time()
    with open(log, "w") as handle:
        try:
            # A new session, so a timeout ends the task's whole process group (torchrun ranks, compile workers).
            process = subprocess.Popen(argv, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
            rc = process.wait(timeout=task.budget_s)
            reason = None if rc == 0 else "exit status"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            rc, reason = 124, f"ran past its {task.budget_s} s budget"
        except OSError as error:
            rc, reason = 127, f"could not start: {error}"
    tail = log.read_text(errors="replace")[-400:] if log.exists() else ""
    return {"id": task.id, "why": task.why, "card_kind": kind, "card": card, "rc": rc, "reason": reason,
            "seconds": round(time.time() - started, 1), "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(argv), "log_tail": tail}


def pack(work: Path, out: Path) -> None:
    """The tasks' logs and results (bench JSON, locks, memory rows) as one file: a call returns at most eight."""
    with tarfile.open(out / "results.tgz", "w:gz") as archive:
        archive.add(work, arcname="gpu-owed")


def main(argv=None, tasks=TASKS, work: Path = Path("/tmp/gpu-owed")) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=540, help="wall time this call may use")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    parser.add_argument("--only", action="append", default=[], help="task id to run whatever the ledger says")
    parser.add_argument("--card", help="card name [torch.cuda.get_device_name()]")
    parser.add_argument("--list", action="store_true", help="print what is owed and what is done, and exit")
    parser.add_argument("--merge", type=Path, help="append a returned ledger's rows to the committed ledger")
    args = parser.parse_args(argv)
    ledger = read_ledger()
    if args.merge:
        rows = read_ledger(args.merge)
        LEDGER.parent.mkdir(parents=True, exist_ok=True)
        with open(LEDGER, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        print(f"{len(rows)} row(s) appended to {LEDGER}")
        return 0
    if args.list:
        for kind in ("H100", "H200"):
            remaining = {task.id for task in owed(tasks, ledger, kind)}
            print(f"{kind}: {len(tasks) - len(remaining)} of {len(tasks)} done")
            for task in tasks:
                print(f"  {'owed' if task.id in remaining else 'done'}  {task.id:<32} {task.budget_s:>4} s  {task.why}")
        return 0
    if args.card:
        card = args.card
    else:
        import torch

        card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    kind = card_kind(card)
    todo = [t for t in tasks if t.id in args.only] if args.only else owed(tasks, ledger, kind)
    deadline = time.monotonic() + args.seconds
    args.out.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"{card} ({kind}): {len(todo)} task(s) owed, {args.seconds:.0f} s to spend", flush=True)
    for task in todo:
        left = deadline - time.monotonic()
        if task.budget_s > left:
            print(f"skip  {task.id}: needs {task.budget_s} s, {left:.0f} s left", flush=True)
            continue
        row = run_task(task, work, logs, kind, card)
        with open(args.out / "ledger.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        pack(work, args.out)
        print(f"{'done' if row['rc'] == 0 else 'FAIL'}  {task.id}: {row['seconds']} s"
              + (f" ({row['reason']})" if row["reason"] else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
