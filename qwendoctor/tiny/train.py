"""Train the trained tiny model: the shipped weights of `qwendoctor/tiny/trained/` come from this script.

    python -m qwendoctor.tiny.train --seed 0 --out DIR [--minutes N]

Two stages on one CPU thread. The VAE learns to autoencode the procedural shapes (64 px crops first: convolutions
do not care where they are and a crop costs a quarter of a full image; full 128 px images last, for the mid-block
attention). The transformer then learns rectified flow on the VAE's normalised, packed latents, conditioned on the
prompt embeddings exactly as `QwenImagePipeline.encode_prompt` makes them with the frozen, seeded text encoder, and
on the pipeline's default negative prompt " " for a tenth of the samples, so true CFG has an unconditional branch.
The result is reproducible from the seed: step counts, not the clock, decide when a stage ends (`--minutes` only
cuts the transformer stage short, and says so in the saved config).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from qwendoctor.tiny import shapes
from qwendoctor.tiny.trained import build_components, make_pipeline

IMAGE_SIZE = 128
NEGATIVE_PROMPT = " "
CAPTION_DROPOUT = 0.1
KL_WEIGHT = 1e-5
ARCHITECTURE = {
    # 8 blocks so block caching has something to skip; width 64 keeps a 50-step CFG render near 1.4 s on a CPU thread.
    "transformer": {"patch_size": 2, "in_channels": 32, "out_channels": 8, "num_layers": 8,
                    "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 32,
                    "guidance_embeds": False, "axes_dims_rope": [4, 6, 6]},
    # 8x down like Qwen-Image's VAE (128 px -> 16x16x8 latents -> 64 packed tokens); narrow at full resolution,
    # where the convolutions cost the most.
    "vae": {"base_dim": 8, "z_dim": 8, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1,
            "temperal_downsample": [False, True, True]},
    # Qwen-Image's own scheduler config: dynamic shifting, exponential time shift, terminal sigma 0.02.
    "scheduler": {"base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
                  "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
                  "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
                  "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False},
    # A seeded random text encoder at toy size, frozen: it only has to tell prompts apart.
    "text_encoder": {
        "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 2048,
                        "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
                        "rope_theta": 1000000.0, "bos_token_id": None, "eos_token_id": 0, "pad_token_id": 0},
        "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                          "out_hidden_size": 32},
        "hidden_size": 32, "vocab_size": 512, "image_token_id": 508, "video_token_id": 507,
        "vision_start_token_id": 509, "vision_end_token_id": 510, "vision_token_id": 511,
        "bos_token_id": None, "eos_token_id": 0, "pad_token_id": 0},
}

_start = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _start:7.1f}s] {message}", flush=True)


def pixels_to_tensor(images):
    """uint8 HxWx3 arrays -> the VAE's (B, 3, 1, H, W) in [-1, 1]."""
    import torch

    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).unsqueeze(2)


def encoder_moments(vae, x):
    """What `AutoencoderKLQwenImage.encode` computes for one frame, with gradients."""
    mean, logvar = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


@contextlib.contextmanager
def single_frame_convolutions():
    """Train the 3D-conv VAE at 2D cost. With one frame and causal zero padding in time, only the last time tap of
    each kernel ever meets data, so that tap as a 2D convolution gives the same numbers and gradients (the other taps
    get zero gradient either way) for a third of the work. Training only: the shipped model runs the stock class."""
    import torch.nn.functional as F
    from diffusers.models.autoencoders import autoencoder_kl_qwenimage as module

    original = module.QwenImageCausalConv3d.forward

    def forward(self, x, cache_x=None):
        if cache_x is None and x.shape[2] == 1 and self.stride[0] == 1 and self.kernel_size[0] == self._padding[4] + 1:
            padding = (self._padding[2], self._padding[0])
            return F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:], padding).unsqueeze(2)
        return original(self, x, cache_x)

    module.QwenImageCausalConv3d.forward = forward
    try:
        yield
    finally:
        module.QwenImageCausalConv3d.forward = original


def train_vae(vae, scenes, seed: int, phases: list[tuple[int, int, int]], lr: float):
    """Reconstruction + a small KL term over `phases` of (steps, crop size, batch); the latent is sampled from
    the posterior so the decoder learns to tolerate the slightly-off latents a few-step render ends on."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng([seed, 1])
    generator = torch.Generator().manual_seed(seed + 10)
    # From the default init, reconstruction sits at the data set's mean colour for hundreds of steps: the latent is
    # too faint against the biases and the posterior noise for the decoder to notice it. No biases, 5x louder
    # posterior means and a posterior std of e^-3 instead of 1 let it through from the first steps.
    with torch.no_grad():
        for name, parameter in vae.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
        logvar_out = vae.quant_conv.weight.shape[0] // 2
        vae.quant_conv.weight[:logvar_out] *= 5.0
        vae.quant_conv.weight[logvar_out:].zero_()
        vae.quant_conv.bias[logvar_out:].fill_(-6.0)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = [(size, batch) for steps, size, batch in phases for _ in range(steps)]
    vae.train()
    with single_frame_convolutions():
        for step, (size, batch) in enumerate(schedule):
            images = []
            for _ in range(batch):
                image = shapes.render(scenes[rng.integers(len(scenes))], rng, IMAGE_SIZE)
                top, left = rng.integers(0, IMAGE_SIZE - size + 1, 2)
                images.append(image[top:top + size, left:left + size])
            x = pixels_to_tensor(images)
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / len(schedule)))
            mean, logvar = encoder_moments(vae, x)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
            reconstruction = vae.decoder(vae.post_quant_conv(z))
            mse = F.mse_loss(reconstruction, x)
            kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
            loss = mse + KL_WEIGHT * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            if step % 50 == 0 or step == len(schedule) - 1:
                psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
                log(f"vae step {step}/{len(schedule)} {size}px mse {mse.item():.5f} ({psnr:.1f} dB) kl {kl.item():.3f}")
    vae.eval()


def encode_latents(vae, scenes, variants: int, seed: int):
    """Posterior means of `variants` renders of each scene: (N, C, H/8, W/8), and the scene index of each."""
    import torch

    latents, owners, batch = [], [], []
    with torch.no_grad():
        for index, (scene, image) in enumerate(shapes.images(scenes, variants, seed + 2, IMAGE_SIZE)):
            batch.append(image)
            owners.append(index // variants)
            if len(batch) == 32 or index == len(scenes) * variants - 1:
                latents.append(encoder_moments(vae, pixels_to_tensor(batch))[0][:, :, 0])
                batch = []
    return torch.cat(latents), torch.tensor(owners)


def encode_prompts(pipe, prompts):
    """The pipeline's own prompt embeddings, zero-padded to one length, with their masks."""
    import torch

    with torch.no_grad():
        embeddings = [pipe.encode_prompt(prompt, device="cpu")[0][0] for prompt in prompts]
    return pad_rows(embeddings)


def pad_rows(rows):
    """Embeddings of different lengths as one zero-padded batch, with the mask of their real tokens."""
    import torch

    length = max(len(row) for row in rows)
    padded = torch.zeros(len(rows), length, rows[0].shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for index, row in enumerate(rows):
        padded[index, :len(row)] = row
        mask[index, :len(row)] = True
    return padded, mask


def zero_init_modulation(transformer) -> None:
    """adaLN-zero: every block starts as the identity and the output as zero, which trains faster from scratch."""
    import torch

    with torch.no_grad():
        for block in transformer.transformer_blocks:
            for modulation in (block.img_mod[1], block.txt_mod[1]):
                modulation.weight.zero_()
                modulation.bias.zero_()
        for layer in (transformer.norm_out.linear, transformer.proj_out):
            layer.weight.zero_()
            layer.bias.zero_()


def adherence(pipe, prompts, seed: int, steps: int) -> dict[str, float]:
    """Share of `prompts` whose render passes the checker, per attribute (a progress signal, not the benchmark)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    images = pipe(prompt=prompts, negative_prompt=[NEGATIVE_PROMPT] * len(prompts), width=IMAGE_SIZE,
                  height=IMAGE_SIZE, num_inference_steps=steps, true_cfg_scale=4.0, generator=generator).images
    verdicts = [shapes.check(image, prompt) for image, prompt in zip(images, prompts)]
    return {key: float(np.mean([verdict[key] for verdict in verdicts])) for key in verdicts[0]}


def scene_labels(scenes):
    """Each scene's attributes as class indices, for the attribute probe."""
    import torch

    vocabularies = [shapes.SHAPES, list(shapes.PALETTE), list(shapes.SIZES), list(shapes.POSITIONS),
                    list(shapes.PALETTE)]
    return torch.tensor([[list(vocabulary).index(value) for vocabulary, value in zip(vocabularies, (
        scene.shape, scene.colour, scene.size, scene.position, scene.background))] for scene in scenes])


class AttributeProbe:
    """Training-only linear heads that must read a prompt's attributes off the text stream halfway up the
    transformer. The text encoder is frozen and random and the tokenizer nearly character-level, so the
    transformer has to learn to spell colour words and bind them to "background" or to the shape before it can
    follow a prompt; this direct signal teaches it in hundreds of steps instead of thousands. Not shipped."""

    def __init__(self, transformer, block: int, labels):
        import torch

        self.labels = labels
        width = transformer.inner_dim
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, int(labels[:, column].max()) + 1)
                                         for column in range(labels.shape[1]))
        self.captured = {}
        transformer.transformer_blocks[block].register_forward_hook(
            lambda module, inputs, outputs: self.captured.__setitem__("text", outputs[0]))

    def loss(self, text_rows, mask):
        import torch.nn.functional as F

        text = self.captured.pop("text")
        pooled = (text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        labels = self.labels[text_rows]
        return sum(F.cross_entropy(head(pooled), labels[:, column], ignore_index=-100)
                   for column, head in enumerate(self.heads)) / len(self.heads)


def clipped_step(loss, parameters, optimizer) -> None:
    """One optimizer step on `loss`, its gradient norm clipped to 1: every tiny trainer's step."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()


def step_with_ema(loss, model, ema, optimizer, step: int, ema_rate: float) -> None:
    """One clipped optimizer step, then the EMA copy moved towards the weights; the EMA's rate warms up over the
    first steps, so early noise does not dominate it (the shipped weights are the EMA's)."""
    import torch

    clipped_step(loss, model.parameters(), optimizer)
    decay = min(ema_rate, (1 + step) / (10 + step))
    with torch.no_grad():
        for ema_param, param in zip(ema.parameters(), model.parameters()):
            ema_param.lerp_(param, 1 - decay)


def train_transformer(pipe, ema, latents, owners, embeddings, masks, labels, args, deadline: float,
                      on_checkpoint, eval_prompts):
    import torch
    import torch.nn.functional as F
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    transformer, scheduler = pipe.transformer, pipe.scheduler
    negative_row = len(labels) - 1
    tokens = latents.shape[1]
    side = int(math.sqrt(tokens))
    # The shift the pipeline applies at this image size: training sees sigmas the way sampling visits them.
    mu = calculate_shift(tokens, scheduler.config.base_image_seq_len, scheduler.config.max_image_seq_len,
                         scheduler.config.base_shift, scheduler.config.max_shift)
    generator = torch.Generator().manual_seed(args.seed + 20)
    probe = AttributeProbe(transformer, len(transformer.transformer_blocks) // 2 - 1, labels)
    optimizer = torch.optim.AdamW([*transformer.parameters(), *probe.heads.parameters()], lr=args.lr,
                                  weight_decay=0.0)
    transformer.train()
    steps_done = 0
    for step in range(args.steps):
        if time.perf_counter() > deadline:
            log(f"--minutes reached: transformer stopped after {step} of {args.steps} steps")
            break
        warmup = min(1.0, (step + 1) / 100)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        rows = torch.randint(len(latents), (args.batch,), generator=generator)
        x0 = latents[rows]
        text_rows = owners[rows].clone()
        text_rows[torch.rand(args.batch, generator=generator) < CAPTION_DROPOUT] = negative_row
        length = int(masks[text_rows].sum(1).max())
        # Logit-normal times (as SD3 trains) put the most samples mid-way, where the shape and its place are
        # decided; the scheduler's own shift then maps them the way sampling at this size spaces its sigmas.
        u = torch.sigmoid(torch.randn(args.batch, generator=generator))
        sigma = scheduler.time_shift(mu, 1.0, u)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        prediction = transformer(hidden_states=noisy, timestep=sigma, encoder_hidden_states=embeddings[text_rows, :length],
                                 encoder_hidden_states_mask=masks[text_rows, :length],
                                 img_shapes=[[(1, side, side)]] * args.batch, return_dict=False)[0]
        flow_loss = F.mse_loss(prediction, noise - x0)
        probe_loss = probe.loss(text_rows, masks[text_rows, :length].float())
        loss = flow_loss + args.probe_weight * probe_loss
        step_with_ema(loss, transformer, ema, optimizer, step, args.ema)
        steps_done = step + 1
        if step % 25 == 0:
            log(f"transformer step {step}/{args.steps} flow loss {flow_loss.item():.4f} probe loss "
                f"{probe_loss.item():.3f} lr {optimizer.param_groups[0]['lr']:.2e}")
        if steps_done % args.eval_every == 0 or steps_done == args.steps:
            on_checkpoint(steps_done, eval_prompts)
    transformer.eval()
    return steps_done


def save(out: Path, components, config: dict) -> None:
    """fp16 safetensors (half the bytes; the loader casts back) and the config with how it was trained."""
    import torch
    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "vae", "text_encoder"):
        save_model(copy.deepcopy(components[name]).to(torch.float16), str(out / f"{name}.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=None, help="cut the transformer stage short at this much "
                        "total wall time (the weights then depend on the machine's speed)")
    parser.add_argument("--vae-steps", type=int, default=1000, help="steps on 64 px crops")
    parser.add_argument("--vae-full-steps", type=int, default=200, help="then steps on full 128 px images")
    parser.add_argument("--variants", type=int, default=4, help="jittered renders encoded per training prompt")
    parser.add_argument("--steps", type=int, default=4000, help="transformer steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--probe-weight", type=float, default=0.5, help="weight of the attribute probe's loss")
    parser.add_argument("--eval-every", type=int, default=800)
    args = parser.parse_args(argv)

    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from qwendoctor.models import quiet_libraries

    quiet_libraries()
    deadline = _start + 60 * args.minutes if args.minutes else math.inf
    config = {"model": copy.deepcopy(ARCHITECTURE), "image_size": IMAGE_SIZE, "negative_prompt": NEGATIVE_PROMPT}
    torch.manual_seed(args.seed)
    components = build_components(config["model"])
    zero_init_modulation(components["transformer"])
    for part in components.values():
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False)
    train_scenes, held_out = shapes.split(args.seed)
    log(f"{len(train_scenes)} training prompts, {len(held_out)} held out; "
        f"transformer {sum(p.numel() for p in components['transformer'].parameters()) / 1e6:.2f} M params, "
        f"vae {sum(p.numel() for p in components['vae'].parameters()) / 1e6:.2f} M")

    vae = components["vae"].requires_grad_(True)
    train_vae(vae, train_scenes, args.seed, [(args.vae_steps, IMAGE_SIZE // 2, 16), (args.vae_full_steps, IMAGE_SIZE, 4)],
              lr=3e-3)
    vae.requires_grad_(False)
    latents, owners = encode_latents(vae, train_scenes, args.variants, args.seed)
    latents_mean, latents_std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
    config["model"]["vae"] |= {"latents_mean": latents_mean.tolist(), "latents_std": latents_std.tolist()}
    vae.register_to_config(latents_mean=latents_mean.tolist(), latents_std=latents_std.tolist())
    from diffusers import QwenImagePipeline

    normalised = (latents - latents_mean[None, :, None, None]) / latents_std[None, :, None, None]
    packed = QwenImagePipeline._pack_latents(normalised, len(normalised), normalised.shape[1],
                                             normalised.shape[2], normalised.shape[3])
    log(f"encoded {len(packed)} latents {tuple(latents.shape[1:])}, mean {latents_mean.tolist()}, "
        f"std {latents_std.tolist()}")

    pipe = make_pipeline(components)
    embeddings, masks = encode_prompts(pipe, [scene.prompt for scene in train_scenes] + [NEGATIVE_PROMPT])
    transformer = components["transformer"].requires_grad_(True)
    ema = copy.deepcopy(transformer).requires_grad_(False).eval()
    eval_pipe = make_pipeline(components | {"transformer": ema})

    def checkpoint(step: int, eval_prompts) -> None:
        ema_components = components | {"transformer": ema}
        config["training"] = {"seed": args.seed, "transformer_steps": step, "args": {
            key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
            "wall_seconds": round(time.perf_counter() - _start, 1), "threads": torch.get_num_threads()}
        save(args.out, ema_components, config)
        with torch.no_grad():
            rates = adherence(eval_pipe, eval_prompts, args.seed, steps=20)
        log(f"checkpoint at step {step} saved to {args.out}; held-out checker (20 steps, {len(eval_prompts)} "
            "prompts): " + ", ".join(f"{key} {rate:.0%}" for key, rate in rates.items()))

    eval_prompts = [scene.prompt for scene in held_out[::8]]
    labels = torch.cat([scene_labels(train_scenes), torch.full((1, 5), -100)])  # the negative prompt: no labels
    steps = train_transformer(pipe, ema, packed, owners, embeddings, masks, labels, args, deadline, checkpoint,
                              eval_prompts)
    if steps % args.eval_every and steps != args.steps:
        checkpoint(steps, eval_prompts)
    log(f"done in {(time.perf_counter() - _start) / 60:.1f} min; weights in {args.out}")


if __name__ == "__main__":
    main()
