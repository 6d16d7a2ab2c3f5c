"""Train `tiny`'s style LoRA: every picture drawn inside a frame, a style the checker reads from the pixels.

    python -m qwendoctor.tiny.style --seed 0 --out DIR

A style LoRA is the other kind users load (the first being a few-step one), and what must survive fusion, FP8 and
the lossless levers is its *effect*; a checker that reads the effect from the pixels (`shapes.style_present`)
judges that without a human. The style is `shapes.render(..., style="frame")`: the scene as before, with a
16 px border in a colour neither the shape nor the background has. It is trained like the base: rectified flow on
the frozen VAE's normalised, packed latents of framed renders of train prompts only, conditioned on the pipeline's
prompt embeddings, a tenth of the captions dropped to the negative prompt " " so the unconditional branch of true
CFG draws the frame too. Only the LoRA learns (the base weights stay frozen), and the prompts carry no trigger word:
loading the LoRA is what turns the style on, as with most style LoRAs. It is used at the base's reference setting
(50 steps, true CFG 4.0, tiny's scheduler unchanged).

Step counts, not the clock, decide everything, so a rerun with the same seed writes the same bytes.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from qwendoctor.tiny import lora, shapes
from qwendoctor.tiny.train import clipped_step

STYLE = "frame"
REFERENCE_STEPS = 50
REFERENCE_CFG = 4.0
CAPTION_DROPOUT = 0.1

_start = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _start:7.1f}s] {message}", flush=True)


def styled_latents(pipe, scenes, variants: int, seed: int):
    """Normalised, packed latents (N, 64, 32) of `variants` framed renders per scene, and each one's scene index."""
    import torch
    from diffusers import QwenImagePipeline

    from qwendoctor.tiny.train import encoder_moments, pixels_to_tensor

    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean)[None, :, None, None]
    std = torch.tensor(vae.config.latents_std)[None, :, None, None]
    latents, owners, batch = [], [], []
    with torch.no_grad():
        for index, scene in enumerate(scenes):
            for variant in range(variants):
                batch.append(shapes.render(scene, np.random.default_rng([seed, index, variant]), lora.IMAGE_SIZE,
                                           style=STYLE))
                owners.append(index)
                if len(batch) == 32:
                    latents.append(encoder_moments(vae, pixels_to_tensor(batch))[0][:, :, 0])
                    batch = []
        if batch:
            latents.append(encoder_moments(vae, pixels_to_tensor(batch))[0][:, :, 0])
    normalised = (torch.cat(latents) - mean) / std
    packed = QwenImagePipeline._pack_latents(normalised, len(normalised), normalised.shape[1], normalised.shape[2],
                                             normalised.shape[3])
    return packed, torch.tensor(owners)


def held_out_rates(pipe, prompts: list[str], seed: int, steps: int) -> dict[str, float]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        images = pipe(prompt=prompts, negative_prompt=[lora.NEGATIVE_PROMPT] * len(prompts), width=lora.IMAGE_SIZE,
                      height=lora.IMAGE_SIZE, num_inference_steps=steps, true_cfg_scale=REFERENCE_CFG,
                      generator=generator, output_type="np").images
    pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    return {"style": float(np.mean([shapes.style_present(image) for image in pixels])),
            "pass": float(np.mean([shapes.check(image, prompt, STYLE)["pass"]
                                   for image, prompt in zip(pixels, prompts)]))}


def train(pipe, latents, owners, embeddings, masks, args, eval_prompts=None):
    """Flow matching of the LoRA on the framed latents; returns the losses."""
    import torch
    import torch.nn.functional as F
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    transformer, config = pipe.transformer, pipe.scheduler.config
    parameters = lora.attach(transformer, args.rank, args.seed)
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed + 40)
    negative_row = len(embeddings) - 1
    side = int(math.sqrt(latents.shape[1]))
    mu = calculate_shift(latents.shape[1], config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    losses = []
    transformer.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lora.cosine_lr(args.lr, step, args.steps)
        rows = torch.randint(len(latents), (args.batch,), generator=generator)
        x0 = latents[rows]
        text_rows = owners[rows].clone()
        text_rows[torch.rand(args.batch, generator=generator) < CAPTION_DROPOUT] = negative_row
        length = int(masks[text_rows].sum(1).max())
        # as the base trained: logit-normal times, shifted the way sampling at this size spaces its sigmas
        sigma = pipe.scheduler.time_shift(mu, 1.0, torch.sigmoid(torch.randn(args.batch, generator=generator)))
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        prediction = transformer(hidden_states=noisy, timestep=sigma,
                                 encoder_hidden_states=embeddings[text_rows, :length],
                                 encoder_hidden_states_mask=masks[text_rows, :length],
                                 img_shapes=[[(1, side, side)]] * args.batch, return_dict=False)[0]
        loss = F.mse_loss(prediction, noise - x0)
        clipped_step(loss, parameters, optimizer)
        losses.append(loss.item())
        if step % 25 == 0 or step == args.steps - 1:
            log(f"style step {step}/{args.steps} flow loss {loss.item():.4f} lr {optimizer.param_groups[0]['lr']:.2e}")
        if eval_prompts and ((step + 1) % args.eval_every == 0 or step == args.steps - 1):
            transformer.eval()
            rates = held_out_rates(pipe, eval_prompts, args.seed, steps=20)
            log(f"held-out ({len(eval_prompts)} prompts, 20 steps, true CFG 4): style present {rates['style']:.0%}, "
                f"checker pass inside the frame {rates['pass']:.0%}")
            transformer.train()
    transformer.eval()
    return losses


def metadata(args, losses) -> dict:
    return {"kind": "style", "base_model": "tiny", "style": STYLE, "steps": [REFERENCE_STEPS],
            "true_cfg_scale": REFERENCE_CFG, "scheduler": {}, "rank": args.rank,
            "checker": "qwendoctor.tiny.shapes.style_present",
            "method": "rectified-flow LoRA fine-tune on framed renders of train prompts",
            "training": {"seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
                         "variants": args.variants, "final_loss": round(float(np.mean(losses[-50:])), 5)}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    lora.trainer_arguments(parser, 1000, "optimizer steps", 400, "log held-out style and pass rates this often")
    parser.add_argument("--variants", type=int, default=2, help="jittered framed renders per train prompt")
    parser.add_argument("--scenes", type=int, default=None, help="use only the first N train scenes (tests)")
    args = parser.parse_args(argv)

    pipe, split_seed = lora.load_base()
    train_scenes, _ = shapes.split(split_seed)
    train_scenes = train_scenes[:args.scenes]
    latents, owners = styled_latents(pipe, train_scenes, args.variants, args.seed)
    log(f"encoded {len(latents)} framed renders of {len(train_scenes)} train prompts")
    embeddings, masks = lora.encode_prompts(pipe, [scene.prompt for scene in train_scenes] + [lora.NEGATIVE_PROMPT])
    eval_prompts = lora.progress_prompts(split_seed, args.eval_prompts)
    losses = train(pipe, latents, owners, embeddings, masks, args, eval_prompts)
    lora.save(pipe.transformer, args.out, metadata(args, losses))
    log(f"done in {(time.perf_counter() - _start) / 60:.1f} min; adapter in {args.out}")


if __name__ == "__main__":
    main()
