"""Issue 27 on a GPU: what holding a LoRA fused, unfused or hotswapped costs the 20B transformer per step, whether a
hotswap under regional compile compiles a new graph, and whether FP8 after fusion keeps a style LoRA's effect.

`synthetic` (the full-size transformer, random bf16 weights) at 1024x1024, true CFG 4.0, with seeded random LoRAs
made here for it: one at Qwen-Image-Lightning's rank (LIGHTNING_RANK) and one at `--rank`, on the 12 attention and
MLP Linears of each of the 60 blocks (benchmarks/cpu/lora_modes.py's TARGETS). Their state dicts are drawn from the
module shapes of the transformer built on the meta device (no second 41 GB copy) and written with diffusers'
`QwenImagePipeline.save_lora_weights`; they load through qwendoctor's `lora_mode` lever like a user's file.

Rows, all in this one process, each the median ms/step of `--timed-steps` timed steps after a 2-step warm-up
(compile lands there, as in runner.time_steps), with its ratio to the no-LoRA row of the same compile setting:

    no_lora, fused, unfused, hotswap   regional compile; fused and unfused at Lightning's rank, then a hotswap to
                                       the --rank LoRA at another scale, with the graphs dynamo made after it
    tiny_fp8                           tiny with its `frame` style LoRA fused, bf16 and then FP8 row-wise, against
                                       no LoRA: how often the style reads (shapes.style_present) and the checker
                                       passes inside the frame, over --tiny-prompts held-out prompts
    unfused_user_rank                  regional compile, unfused at --rank
    eager_no_lora, eager_unfused, eager_fused

One synthetic pipeline is built; each row after the first gets a new transformer (the old one freed first: two do
not fit beside the 8B text encoder on an 80 GB card), except the hotswap, which reuses the unfused one. The JSON is
written after every row, so a timeout keeps what landed.

    python3 benchmarks/tools/lora_gpu.py --out DIR [--rows no_lora,fused,unfused,hotswap] [--rank 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
# Qwen-Image-Lightning's rank, inferred from its published files' size, not read from a header (none was
# reachable here): lightx2v/Qwen-Image-Lightning's 16-bit files (Qwen-Image-Lightning-{4,8}steps-V1.x-bf16) are
# 850 MB, and the LFS pointers of their fp16 copies (huggingface.co/PJMixers-Images/lightx2v_Qwen-Image-Lightning-fp16)
# give 849,603,192 bytes. Rank 64 on these 12 Linears of the 60 blocks is 424,673,280 parameters, 849,346,560 bytes
# in 16 bits; the other 256,632 bytes are the safetensors header of 1,440 tensors. Rank 32 or 128 would be half or
# twice the size (tests/test_lora_gpu_tool.py checks the arithmetic).
LIGHTNING_RANK = 64
LIGHTNING_FILE_BYTES = 849_603_192
LIGHTNING_RANK_SOURCE = ("inferred from the published file size (849,603,192 bytes in 16 bits = rank 64 on the 12 "
                         "attention and MLP Linears of 60 blocks plus a 257 kB header); not read from the file")
# The LoRA's output against the base Linear's, for random base weights of std 1/sqrt(fan_in): big enough to change
# the image, small enough that the random 60-block transformer stays finite.
RELATIVE = 0.05
PROMPT = "a red fox in the snow"
SEED = 0
USER_SCALE = 0.8  # the hotswapped LoRA's scale: another value than the first's, which must not recompile either
# What the rows run on. tests/test_lora_gpu_tool.py runs the whole script with tiny on the CPU, eager, instead.
MODEL, DEVICE, DTYPE, COMPILE = "synthetic", "cuda", "bfloat16", "regional"
# What stays allocated once the transformer is freed: the 8B text encoder (15.4 GiB) and the VAE, with room to spare.
KEPT_GIB = 30

ROWS = ("no_lora", "fused", "unfused", "hotswap", "tiny_fp8", "unfused_user_rank", "eager_no_lora", "eager_unfused",
        "eager_fused")
# name -> (which LoRA: None, "lightning" or "user"; lora_mode; compiled)
SYNTHETIC_ROWS = {
    "no_lora": (None, "unfused", True), "fused": ("lightning", "fused", True),
    "unfused": ("lightning", "unfused", True), "unfused_user_rank": ("user", "unfused", True),
    "eager_no_lora": (None, "unfused", False), "eager_unfused": ("lightning", "unfused", False),
    "eager_fused": ("lightning", "fused", False),
}


# -- the LoRAs ---------------------------------------------------------------------------------------------------

def lora_shapes(config: dict, targets=TARGETS) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each block Linear a LoRA adapts, by module name, from the transformer built
    on the meta device: shapes without weights, so the 20B model's LoRA is made without a second copy of it."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**config)
    return {name: (module.in_features, module.out_features) for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.")
            and any(name.endswith("." + target) for target in targets)}


def payload_bytes(shapes: dict[str, tuple[int, int]], rank: int, bytes_per_value: int = 2) -> int:
    """The tensor bytes of a LoRA of `rank` on `shapes` (lora_A: rank x in, lora_B: out x rank)."""
    return sum(rank * (fan_in + fan_out) for fan_in, fan_out in shapes.values()) * bytes_per_value


def lora_state_dict(shapes: dict[str, tuple[int, int]], rank: int, seed: int, relative: float = RELATIVE,
                    dtype=None, device: str = "cpu") -> dict:
    """A seeded random LoRA in peft's key format (`<module>.lora_A.weight`), as CPU tensors for the writer.
    lora_A has std 1/sqrt(fan_in) and lora_B std relative/sqrt(rank): with diffusers' default alpha = rank
    (scaling 1), B(Ax) is about `relative` of the output of a Linear with random weights of std 1/sqrt(fan_in)."""
    import torch

    dtype = dtype or torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    with torch.no_grad():
        for name in sorted(shapes):
            fan_in, fan_out = shapes[name]
            down = torch.randn(rank, fan_in, generator=generator, device=device) / math.sqrt(fan_in)
            up = torch.randn(fan_out, rank, generator=generator, device=device) * (relative / math.sqrt(rank))
            state[f"{name}.lora_A.weight"] = down.to(dtype).cpu().contiguous()
            state[f"{name}.lora_B.weight"] = up.to(dtype).cpu().contiguous()
    return state


def write_lora(directory: Path, shapes: dict[str, tuple[int, int]], rank: int, seed: int,
               relative: float = RELATIVE, dtype=None, device: str = "cpu") -> Path:
    """The LoRA written in diffusers' format by diffusers' own writer, as a user's file would be."""
    from diffusers import QwenImagePipeline

    from qwendoctor.levers import lora

    state = lora_state_dict(shapes, rank, seed, relative, dtype, device)
    directory.mkdir(parents=True, exist_ok=True)
    QwenImagePipeline.save_lora_weights(str(directory), transformer_lora_layers=state, weight_name=lora.WEIGHT_NAME)
    return directory / lora.WEIGHT_NAME


# -- measuring ---------------------------------------------------------------------------------------------------

def to_uint8(image):
    import numpy as np

    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)  # as benchmarks/tiny/measure.py


def timed(model, workload, profile, timed_steps: int) -> tuple[dict, object]:
    """runner.time_steps, keeping the timed render's image, with what dynamo compiled on the way."""
    from probes import timing
    from qwendoctor import compile_stats, runner

    before = compile_stats.snapshot()
    warmup_s = runner.warm_up(model, workload, profile, PROMPT, SEED)
    timing.reset_peak_memory(model.device)
    clock = timing.StepClock(model.device)
    clock.start()
    image = runner.render(model, workload, dataclasses.replace(profile, steps=timed_steps), PROMPT, SEED, clock=clock)
    steps = clock.step_seconds
    return {"step_ms_median": 1000 * statistics.median(steps), "step_ms": [round(1000 * s, 2) for s in steps],
            "warmup_s": round(warmup_s, 1), "peak_memory_gib": timing.peak_memory_gib(model.device),
            "compiled": compile_stats.since(before)}, image


def psnr(a, b) -> float:
    from qwendoctor import quality

    return round(quality.compare([a], [b], with_lpips=False)["psnr_db"], 2)


def free_cuda() -> None:
    import torch

    torch._dynamo.reset()  # compiled graphs hold the transformer's weights
    gc.collect()
    torch.cuda.empty_cache()


class Synthetic:
    """One synthetic pipeline; a new transformer per row, the previous one freed first."""

    def __init__(self, args, capabilities, loras: dict):
        self.args, self.capabilities, self.loras = args, capabilities, loras
        self.model = None
        self.pristine = None
        self.held = None  # the row whose transformer the pipeline holds, once it rendered

    def workload(self, which: str | None):
        from qwendoctor.profile import Workload

        loras = (self.loras[which],) if which else ()
        return Workload(model=MODEL, width=self.args.width, height=self.args.height, reference_steps=50,
                        dtype=DTYPE, loras=loras).validate()

    def profile(self, mode: str, compiled: bool):
        from qwendoctor.profile import Profile

        base = Profile.from_text(self.args.profile)
        return dataclasses.replace(base, lora_mode=mode, compile=COMPILE if compiled else "none").validate()

    def prepare(self, row: str):
        """The pipeline with a new transformer holding `row`'s LoRA as it says (compiled at its first render): the
        row's workload and profile, and the seconds the load and the levers took."""
        import torch

        from qwendoctor import levers, models
        from qwendoctor.profile import Profile, check_runnable

        which, mode, compiled = SYNTHETIC_ROWS[row]
        workload, profile = self.workload(which), self.profile(mode, compiled)
        check_runnable(profile, workload, self.capabilities)
        self.held = None
        started = time.perf_counter()
        extra = {}
        if self.model is None:
            self.model = models.load_model(MODEL, DEVICE, DTYPE, on_cpu=levers.load_on_cpu(profile))
            self.pristine = models.pristine_transformer_source(self.model)
            extra["pipeline_load_s"] = round(time.perf_counter() - started, 1)
        else:
            pipe = self.model.pipe
            levers.optimize(pipe, Profile(), undoable_only=True)  # as the pool: wrappers hold the transformer
            pipe.transformer = None
            free_cuda()
            left = torch.cuda.memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
            if left > KEPT_GIB:
                # A second transformer would not fit: say so, instead of an out-of-memory error half-way.
                raise RuntimeError(f"the previous transformer was not freed: {left:.1f} GiB still allocated")
            extra["allocated_gib_after_free"] = round(left, 1)
            pipe.transformer = self.pristine()
            extra["transformer_build_s"] = round(time.perf_counter() - started, 1)
        applied = time.perf_counter()
        levers.optimize(self.model.pipe, profile, workload=workload)  # loads (and fuses) the LoRA; compile is lazy
        extra["levers_s"] = round(time.perf_counter() - applied, 1)
        return workload, profile, extra

    def run(self, row: str) -> tuple[dict, object]:
        workload, profile, extra = self.prepare(row)
        result, image = timed(self.model, workload, profile, self.args.timed_steps)
        self.held = row
        return {"lora": SYNTHETIC_ROWS[row][0], "lora_mode": profile.lora_mode, "compile": profile.compile,
                "profile": profile.describe(), **extra, **result}, image

    def hotswap(self, images: dict) -> tuple[dict, object]:
        """The unfused Lightning-rank LoRA under regional compile, swapped for the --rank one at USER_SCALE."""
        from qwendoctor import compile_stats
        from qwendoctor.levers import lora

        setup = {}
        if self.held != "unfused":  # the unfused row did not run (or failed) right before: compile it here
            workload, profile, setup = self.prepare("unfused")
            from qwendoctor import runner

            runner.warm_up(self.model, workload, profile, PROMPT, SEED)
            setup["compiled_for_the_swap"] = True
        profile = self.profile("unfused", True)
        self.held = None  # whatever happens next, the transformer no longer holds the unfused row's LoRA alone
        graphs = compile_stats.snapshot()
        started = time.perf_counter()
        lora.hotswap(self.model.pipe, (self.loras["user"],), MODEL)
        swap_s = time.perf_counter() - started
        result, image = timed(self.model, self.workload("user"), profile, self.args.timed_steps)
        after = compile_stats.since(graphs)
        new = after.get("graphs", 0)
        row = {"lora": "user", "lora_mode": "unfused (hotswapped)", "compile": profile.compile, **setup,
               "hotswap_s": round(swap_s, 1), **result, "graphs_new_after_hotswap": new,
               "no_new_graph": new == 0,
               "graph_count": "torch._dynamo.utils.counters['stats']['unique_graphs'] (qwendoctor.compile_stats) "
                              "from before the hotswap through its warm-up and timed renders, under inductor"}
        if "unfused" in images:
            # The swap took: the image is another one than the Lightning-rank LoRA's.
            row["psnr_db_vs_unfused"] = psnr(image, images["unfused"])
        return row, image

    def close(self) -> None:
        if self.model is not None:
            from qwendoctor import levers
            from qwendoctor.profile import Profile

            levers.optimize(self.model.pipe, Profile(), undoable_only=True)
        self.model, self.pristine, self.held = None, None, None
        free_cuda()


def weight_kinds(transformer) -> dict[str, int]:
    """The blocks' Linears by the type of their weight: Parameter (bf16) or torchao's FP8 tensor subclasses."""
    import collections

    import torch

    return dict(collections.Counter(type(module.weight).__name__
                                    for module in transformer.transformer_blocks.modules()
                                    if isinstance(module, torch.nn.Linear)))


def tiny_fp8(args, capabilities, record) -> None:
    """The frame style LoRA on tiny on CUDA, fused in bf16, then FP8 row-wise after the fusion; and no LoRA."""
    import numpy as np

    from qwendoctor import runner
    from qwendoctor.levers import lora
    from qwendoctor.profile import Profile, Workload
    from qwendoctor.tiny import shapes
    from qwendoctor.tiny.trained import read_config

    prompts = shapes.held_out_prompts(read_config()["training"]["seed"])[:args.tiny_prompts]
    frame = lora.parse_spec("tiny:frame", "tiny")
    styled = Workload(model="tiny", width=128, height=128, reference_steps=args.tiny_steps, dtype="bfloat16",
                      loras=(frame,)).validate()
    plain = dataclasses.replace(styled, loras=()).validate()
    images_by = {}
    for name, workload, profile in (("bf16_fused", styled, Profile(lora_mode="fused")),
                                    ("fp8_rowwise_fused", styled, Profile(lora_mode="fused",
                                                                          quantization="fp8_rowwise")),
                                    ("bf16_no_lora", plain, Profile())):
        started = time.perf_counter()
        try:
            model = runner.build(workload, profile, capabilities)
            kinds = weight_kinds(model.pipe.transformer)
            images, seconds = [], []
            for seed, prompt in enumerate(prompts):
                began = time.perf_counter()
                images.append(runner.render(model, workload, profile, prompt, seed))
                seconds.append(time.perf_counter() - began)
            del model
            images_by[name] = images
            result = {
                "profile": profile.describe() or "default", "lora": "tiny:frame" if workload.loras else None,
                "block_linear_weights": kinds,
                "style_present": float(np.mean([shapes.style_present(to_uint8(image)) for image in images])),
                "checker_pass_inside_frame": float(np.mean([shapes.check(to_uint8(image), prompt, "frame")["pass"]
                                                            for image, prompt in zip(images, prompts)])),
                "checker_pass_as_plain": float(np.mean([shapes.check(to_uint8(image), prompt)["pass"]
                                                        for image, prompt in zip(images, prompts)])),
                "s_per_image_median": round(statistics.median(seconds), 3),
            }
            if name != "bf16_fused" and "bf16_fused" in images_by:
                from qwendoctor import quality

                result["vs_bf16_fused"] = {key: round(value, 3) for key, value in quality.compare(
                    images, images_by["bf16_fused"], with_lpips=False).items()}
        except Exception as error:  # noqa: BLE001 - a refusal (torchao, the card) is the finding
            result = {"error": runner.classify_failure(error), "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - started, 1)
        record(name, result)
        free_cuda()


# -- the run -----------------------------------------------------------------------------------------------------

def write(out: Path, document: dict) -> None:
    partial = out / "lora_gpu.json.partial"
    partial.write_text(json.dumps(document, indent=1) + "\n")
    partial.replace(out / "lora_gpu.json")


def add_ratios(rows: dict) -> None:
    """Each row's step against the no-LoRA row of the same compile setting, measured in this run."""
    for name, row in rows.items():
        if "step_ms_median" not in row or name.endswith("no_lora"):
            continue
        baseline = rows.get("eager_no_lora" if name.startswith("eager_") else "no_lora", {})
        if "step_ms_median" in baseline:
            row["vs_no_lora"] = round(row["step_ms_median"] / baseline["step_ms_median"], 4)


def verdicts(rows: dict) -> dict:
    found = {}
    if "vs_no_lora" in rows.get("fused", {}):
        found["fused_within_1pct_of_no_lora"] = rows["fused"]["vs_no_lora"] <= 1.01
    if "no_new_graph" in rows.get("hotswap", {}):
        found["hotswap_compiled_no_new_graph"] = rows["hotswap"]["no_new_graph"]
    tiny = rows.get("tiny_fp8", {})
    if "style_present" in tiny.get("fp8_rowwise_fused", {}) and "style_present" in tiny.get("bf16_fused", {}):
        found["fp8_after_fusion_style_present"] = tiny["fp8_rowwise_fused"]["style_present"]
        found["bf16_fused_style_present"] = tiny["bf16_fused"]["style_present"]
    return found


def table(rows: dict) -> str:
    lines = ["| row | LoRA | mode | compile | ms / step | vs no LoRA | warm-up s | peak GiB | note |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for name, row in rows.items():
        if name == "tiny_fp8":
            continue
        if "error" in row:
            lines.append(f"| {name} | | | | | | | | {row['error']} |")
            continue
        note = ""
        if name == "hotswap":
            note = f"{row['graphs_new_after_hotswap']} new graph(s) after the swap"
        ratio = "1.000" if name.endswith("no_lora") else f"{row['vs_no_lora']:.3f}" if "vs_no_lora" in row else "-"
        peak = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.1f}"
        lines.append(f"| {name} | {row['lora'] or '-'} | {row['lora_mode']} | {row['compile']} | "
                     f"{row['step_ms_median']:.1f} | {ratio} | {row['warmup_s']} | {peak} | {note} |")
    tiny = rows.get("tiny_fp8")
    if tiny:
        lines += ["", "| tiny, frame LoRA | style read | checker inside the frame | block Linears |", "|---|---:|---:|---|"]
        for name, row in tiny.items():
            if name == "error" or "error" in row:
                lines.append(f"| {name} | | | {row['error']} |")
            else:
                lines.append(f"| {name} | {row['style_present']:.0%} | {row['checker_pass_inside_frame']:.0%} | "
                             f"{row['block_linear_weights']} |")
    return "\n".join(lines)


def parse_rows(text: str) -> list[str]:
    rows = [row.strip() for row in text.split(",") if row.strip()]
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown row {unknown[0]!r}; rows: {', '.join(ROWS)}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for lora_gpu.json")
    parser.add_argument("--rows", type=parse_rows, default=list(ROWS), help=f"comma-separated, of {','.join(ROWS)}")
    parser.add_argument("--rank", type=int, default=16, help="the user-given rank (hotswapped in; its own row)")
    parser.add_argument("--timed-steps", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--profile", default="", help="fields every row adds, e.g. cfg_batching=true")
    parser.add_argument("--tiny-prompts", type=int, default=20)
    parser.add_argument("--tiny-steps", type=int, default=50)
    args = parser.parse_args(argv)
    if not 1 <= args.rank <= LIGHTNING_RANK and "hotswap" in args.rows:
        parser.error(f"--rank {args.rank}: the hotswap row swaps it in for the rank-{LIGHTNING_RANK} LoRA, so it "
                     f"must be 1 to {LIGHTNING_RANK} (leave out the hotswap row for another)")
    if args.rank < 1:
        parser.error("--rank must be positive")

    import diffusers
    import peft
    import torch

    from qwendoctor import models, runner
    from qwendoctor.capabilities import detect_capabilities
    from qwendoctor.levers import lora

    if DEVICE == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the 20B transformer is 41 GB in bf16)")
    args.out.mkdir(parents=True, exist_ok=True)
    capabilities = detect_capabilities()
    rows: dict = {}
    document = {
        "command": "python3 benchmarks/tools/lora_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.date.today().isoformat(), "model": MODEL, "device": DEVICE,
        "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else None,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())) if DEVICE == "cuda" else None,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
        "workload": f"{MODEL} {args.width}x{args.height} {DTYPE}, true CFG 4.0, prompt {PROMPT!r}, seed {SEED}",
        "compiled_rows": f"compile={COMPILE}, torch.compile's default backend (inductor)",
        "timed_steps": args.timed_steps, "rows_asked": args.rows, "rows": rows,
        "step_ms": "median of the timed steps; the first step includes the prompt's encoding",
        "eager_and_compiled": "each row's vs_no_lora is against the no-LoRA row of the same compile setting",
    }
    record_started = time.perf_counter()

    def record(name: str, result: dict, key: str | None = None) -> None:
        if key is None:
            rows[name] = result
        else:
            rows.setdefault(key, {})[name] = result
        add_ratios(rows)
        document["verdicts"] = verdicts(rows)
        document["elapsed_s"] = round(time.perf_counter() - record_started, 1)
        write(args.out, document)
        print(f"{key + ':' if key else ''}{name}: {json.dumps(result)[:600]}", flush=True)

    synthetic_rows = [row for row in args.rows if row != "tiny_fp8"]
    loras = {}
    if synthetic_rows:
        started = time.perf_counter()
        shapes = lora_shapes(models.transformer_config(MODEL))
        directory = Path(tempfile.mkdtemp(prefix="lora-gpu-"))
        made = {}
        for which, rank, seed, scale in (("lightning", LIGHTNING_RANK, 0, 1.0), ("user", args.rank, 1, USER_SCALE)):
            file = write_lora(directory / which, shapes, rank, seed, dtype=getattr(torch, DTYPE), device=DEVICE)
            loras[which] = lora.parse_spec(f"{file}:{scale}", MODEL)
            made[which] = {"rank": rank, "seed": seed, "scale": scale, "relative_output": RELATIVE,
                           "file_bytes": file.stat().st_size, "sha256": loras[which].sha256}
        made["lightning"]["rank_source"] = LIGHTNING_RANK_SOURCE
        made["lightning"]["published_file_bytes"] = LIGHTNING_FILE_BYTES
        document["loras"] = {**made, "targets": list(TARGETS), "adapted_linears": len(shapes),
                             "made_s": round(time.perf_counter() - started, 1)}
        write(args.out, document)

    bench = Synthetic(args, capabilities, loras)
    images: dict = {}
    for name in args.rows:
        started = time.perf_counter()
        try:
            if name == "tiny_fp8":
                bench.close()  # the synthetic pipeline's 58 GB go before tiny loads
                tiny_fp8(args, capabilities, lambda sub, result: record(sub, result, key="tiny_fp8"))
                continue
            if name == "hotswap":
                result, image = bench.hotswap(images)
            else:
                result, image = bench.run(name)
            images[name] = image
            if name == "fused" and "unfused" in images or name == "unfused" and "fused" in images:
                result["psnr_db_fused_vs_unfused"] = psnr(images["fused"], images["unfused"])
            if name in ("fused", "unfused") and "no_lora" in images:
                result["psnr_db_vs_no_lora"] = psnr(image, images["no_lora"])
        except Exception as error:  # noqa: BLE001 - recorded; the next row gets a new transformer
            bench.held = None
            result = {"error": runner.classify_failure(error), "traceback": traceback.format_exc()[-3000:]}
            if name == "tiny_fp8":  # beside the sub-rows that landed
                record("error", result, key=name)
                continue
        result["row_s"] = round(time.perf_counter() - started, 1)
        record(name, result)
    bench.close()
    if loras:
        shutil.rmtree(directory, ignore_errors=True)  # 1 GB of random LoRAs in the machine's /tmp
    print("\n" + table(rows), flush=True)
    print(json.dumps(document.get("verdicts", {})), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
