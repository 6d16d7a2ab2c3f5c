"""Train `tiny`'s step-distilled LoRA: 4 or 8 steps, true CFG off, drawing what the 50-step true-CFG base draws.

    python -m qwendoctor.tiny.distill --seed 0 --out DIR

Users of Qwen-Image run it fast with a few-step LoRA (Qwen-Image-Lightning: 4 or 8 steps, CFG off, its own
scheduler config). This script gives `tiny` such an adapter, so the lever that searches distilled LoRAs has one to
pick on the CPU. The method is trajectory distillation in the spirit of rectified-flow reflow / InstaFlow and of
progressive and consistency-trajectory distillation: the base model (the teacher) draws train prompts at the
reference setting (50 steps, true CFG 4.0, negative prompt " ") from seeded noise, every intermediate latent kept;
its Euler path is piecewise linear in sigma, so it is known exactly at every sigma. The student (the base plus a
LoRA, conditional branch only) is then trained, for each of its own N steps, to predict the velocity that takes
the teacher's latent at the step's start sigma to the teacher's latent at its end sigma:
v* = (x_teacher(s_{i+1}) - x_teacher(s_i)) / (s_{i+1} - s_i). N is drawn from {4, 8} per sample, so one adapter
serves both. Per-segment matching needs no backpropagation through the sampler and folds CFG into the student.

The student samples with Qwen-Image-Lightning's published scheduler settings (base_shift = max_shift = ln 3, no
terminal stretch: sigmas 1, 0.9, 0.75, 0.5 at 4 steps), which differ from tiny's own config (1, 0.74, 0.43, 0.02 at
4 steps); the adapter declares them in its adapter.json so that a runner must carry a scheduler override, as with
the real Lightning LoRAs. Measured (benchmarks/tiny/adapters.json), this toy student is forgiving: under tiny's own
scheduler it still passes the checker, 1 dB lower at 4 steps. The real ones are not.

Only train prompts (`shapes.split`) are drawn; step counts, not the clock, decide everything, so a rerun with the
same seed writes the same bytes.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from qwendoctor.tiny import lora, shapes
from qwendoctor.tiny.train import clipped_step

STEP_COUNTS = (4, 8)
TEACHER_STEPS = 50
TEACHER_CFG = 4.0
# Qwen-Image-Lightning's scheduler config, as its README gives it, on top of tiny's own.
SCHEDULER_OVERRIDES = {"base_shift": math.log(3), "max_shift": math.log(3), "shift_terminal": None}

_start = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _start:7.1f}s] {message}", flush=True)


def teacher_trajectories(pipe, prompts: list[str], seed: int, batch: int = 16):
    """(states, sigmas): the base model's 50-step true-CFG path for each prompt from seeded noise, (P, 51, 64, 32)
    with states[:, 0] the noise and states[:, -1] the final latent, and the 51 sigmas it visits (the last 0)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tokens, channels = 64, pipe.transformer.config.in_channels
    trajectories = []
    for first in range(0, len(prompts), batch):
        chunk = prompts[first:first + batch]
        noise = torch.randn(len(chunk), tokens, channels, generator=generator)
        states = [noise]

        def keep(pipeline, step, timestep, kwargs):
            states.append(kwargs["latents"].clone())
            return kwargs

        with torch.no_grad():
            pipe(prompt=chunk, negative_prompt=[lora.NEGATIVE_PROMPT] * len(chunk), width=lora.IMAGE_SIZE,
                 height=lora.IMAGE_SIZE, num_inference_steps=TEACHER_STEPS, true_cfg_scale=TEACHER_CFG,
                 latents=noise.clone(), output_type="latent", callback_on_step_end=keep)
        trajectories.append(torch.stack(states, 1))
        log(f"teacher: {first + len(chunk)}/{len(prompts)} trajectories")
    return torch.cat(trajectories), lora.sigmas_for(pipe, TEACHER_STEPS)


def segment_table(teacher_sigmas, student_sigmas):
    """For each student sigma: the teacher segment it falls in and how far along, to read the teacher's piecewise-
    linear path there."""
    import torch

    teacher = teacher_sigmas.double()
    index, weight = [], []
    for sigma in student_sigmas.double():
        j = int(torch.clamp((teacher >= sigma).sum() - 1, 0, len(teacher) - 2))
        index.append(j)
        weight.append(float((teacher[j] - sigma) / (teacher[j] - teacher[j + 1])))
    return torch.tensor(index), torch.tensor(weight, dtype=torch.float32)


def on_path(states, rows, index, weight):
    """The teacher's latent for each row at its student sigma."""
    w = weight[:, None, None]
    return (1 - w) * states[rows, index] + w * states[rows, index + 1]


def held_out_rate(pipe, prompts: list[str], steps: int, seed: int) -> float:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        images = pipe(prompt=prompts, width=lora.IMAGE_SIZE, height=lora.IMAGE_SIZE, num_inference_steps=steps,
                      true_cfg_scale=1.0, generator=generator, output_type="np").images
    pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    return float(np.mean([shapes.check(image, prompt)["pass"] for image, prompt in zip(pixels, prompts)]))


def train(pipe, states, teacher_sigmas, embeddings, masks, args, eval_prompts=None):
    """Per-segment velocity matching; returns the losses logged."""
    import torch
    import torch.nn.functional as F

    transformer = pipe.transformer
    parameters = lora.attach(transformer, args.rank, args.seed)
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed + 30)
    grids = {}
    for steps in STEP_COUNTS:
        sigmas = lora.sigmas_for(pipe, steps, SCHEDULER_OVERRIDES).float()
        grids[steps] = (sigmas, *segment_table(teacher_sigmas, sigmas))
    student_pipe = None
    losses = []
    transformer.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lora.cosine_lr(args.lr, step, args.steps)
        rows = torch.randint(len(states), (args.batch,), generator=generator)
        choice = torch.randint(len(STEP_COUNTS), (args.batch,), generator=generator)
        start_sigma, end_sigma, start_index, start_weight, end_index, end_weight = ([] for _ in range(6))
        for pick in choice.tolist():
            sigmas, index, weight = grids[STEP_COUNTS[pick]]
            i = int(torch.randint(STEP_COUNTS[pick], (1,), generator=generator))
            start_sigma.append(sigmas[i]), end_sigma.append(sigmas[i + 1])
            start_index.append(index[i]), start_weight.append(weight[i])
            end_index.append(index[i + 1]), end_weight.append(weight[i + 1])
        start_sigma, end_sigma = torch.stack(start_sigma), torch.stack(end_sigma)
        x_start = on_path(states, rows, torch.stack(start_index), torch.stack(start_weight))
        x_end = on_path(states, rows, torch.stack(end_index), torch.stack(end_weight))
        target = (x_end - x_start) / (end_sigma - start_sigma)[:, None, None]
        length = int(masks[rows].sum(1).max())
        prediction = transformer(hidden_states=x_start, timestep=start_sigma,
                                 encoder_hidden_states=embeddings[rows, :length],
                                 encoder_hidden_states_mask=masks[rows, :length],
                                 img_shapes=[[(1, 8, 8)]] * args.batch, return_dict=False)[0]
        loss = F.mse_loss(prediction, target)
        clipped_step(loss, parameters, optimizer)
        losses.append(loss.item())
        if step % 25 == 0 or step == args.steps - 1:
            log(f"student step {step}/{args.steps} loss {loss.item():.4f} lr {optimizer.param_groups[0]['lr']:.2e}")
        if eval_prompts and ((step + 1) % args.eval_every == 0 or step == args.steps - 1):
            transformer.eval()
            student_pipe = student_pipe or lora_pipeline(pipe)
            rates = {steps: held_out_rate(student_pipe, eval_prompts, steps, args.seed) for steps in STEP_COUNTS}
            log(f"held-out checker pass, CFG off ({len(eval_prompts)} prompts): " +
                ", ".join(f"{steps} steps {rate:.0%}" for steps, rate in rates.items()))
            transformer.train()
    transformer.eval()
    return losses


def lora_pipeline(pipe):
    """The same components with the distilled scheduler config (CFG is off by not passing a negative prompt)."""
    from qwendoctor.tiny.trained import make_pipeline

    return make_pipeline(dict(pipe.components) | {"scheduler": lora.scheduler_for(pipe, SCHEDULER_OVERRIDES)})


def metadata(args, losses) -> dict:
    return {"kind": "distilled", "base_model": "tiny", "steps": list(STEP_COUNTS), "true_cfg_scale": 1.0,
            "scheduler": SCHEDULER_OVERRIDES, "rank": args.rank,
            "method": "per-segment trajectory distillation from the 50-step true-CFG 4.0 base",
            "teacher": {"steps": TEACHER_STEPS, "true_cfg_scale": TEACHER_CFG, "negative_prompt": " "},
            "training": {"seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
                         "teacher_prompts": args.prompts, "final_loss": round(float(np.mean(losses[-50:])), 5)}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    lora.trainer_arguments(parser, 1500, "student optimizer steps", 500, "log the held-out pass rate this often")
    parser.add_argument("--prompts", type=int, default=512, help="train prompts the teacher draws, one noise each")
    parser.add_argument("--teacher-cache", type=Path, default=None,
                        help="save the teacher trajectories here, or load them if present (same seed and prompts)")
    args = parser.parse_args(argv)

    import torch

    pipe, split_seed = lora.load_base()
    train_scenes, _ = shapes.split(split_seed)
    order = np.random.default_rng([args.seed, 3]).permutation(len(train_scenes))[:args.prompts]
    prompts = [train_scenes[index].prompt for index in order]
    log(f"{len(prompts)} of {len(train_scenes)} train prompts for the teacher")

    key = f"{args.seed}-{args.prompts}"
    if args.teacher_cache and args.teacher_cache.exists() and torch.load(args.teacher_cache)["key"] == key:
        cached = torch.load(args.teacher_cache)
        states, teacher_sigmas = cached["states"], cached["sigmas"]
        log(f"teacher trajectories read from {args.teacher_cache}")
    else:
        states, teacher_sigmas = teacher_trajectories(pipe, prompts, args.seed)
        if args.teacher_cache:
            torch.save({"key": key, "states": states, "sigmas": teacher_sigmas}, args.teacher_cache)
    embeddings, masks = lora.encode_prompts(pipe, prompts)
    eval_prompts = lora.progress_prompts(split_seed, args.eval_prompts)
    losses = train(pipe, states, teacher_sigmas, embeddings, masks, args, eval_prompts)
    lora.save(pipe.transformer, args.out, metadata(args, losses))
    log(f"done in {(time.perf_counter() - _start) / 60:.1f} min; adapter in {args.out}")


if __name__ == "__main__":
    main()
