"""The `qwendoctor` command: check, tune, generate.

Exit codes: 0 success (and `qwendoctor` alone, which prints the help); 1 the job failed (a check failed or
crashed, no profile met the floor, a lock from another setup); 2 bad input (unknown option, invalid value, missing
or invalid lock, a number outside its range in probes.limits); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
Errors are one line on stderr, `qwendoctor: error: ...`; set QWENDOCTOR_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import click

from probes import limits
from probes.context import exc_line
from qwendoctor.capabilities import detect_capabilities, probe_capabilities
from qwendoctor.errors import EXIT_FAILURE, EXIT_USAGE, QwendoctorError, UsageError
from qwendoctor.noise import quiet_import_noise
from qwendoctor.levers import PARALLEL_STRATEGIES
from probes.workload import TASKS
from qwendoctor.tune import DEFAULT_HEARTBEAT_S  # light: tune imports torch and optuna only when it runs

DEFAULT_LOCK = "qwendoctor.lock"
# Set by tune: an interrupted tune resumes when rerun, an interrupted generate or bench has nothing to resume.
_resumable = False


def _in_range(field: str, value, option: str) -> None:
    """An option's number against its range in probes.limits (the lock's and --profile's fields get the same)."""
    if value is None:
        return
    try:
        limits.check(field, value, label=option)
    except limits.RangeError as error:
        raise UsageError(str(error)) from None


def _check_cache_dir() -> None:
    """Reference renders are cached after minutes of rendering: an unusable $QWENDOCTOR_CACHE is named first."""
    from qwendoctor.files import CACHE_ENV, writable_directory

    if os.environ.get(CACHE_ENV):
        writable_directory(os.environ[CACHE_ENV], CACHE_ENV)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.version_option(package_name="qwendoctor")
@click.pass_context
def cli(context):
    """Measure, tune and run Qwen-Image as fast as this machine allows."""
    if context.invoked_subcommand is None:
        # A bare `qwendoctor` asks what the tool does: the help, on stdout, exit 0 (not a usage error).
        click.echo(context.get_help())


def _register_check() -> None:
    from qwendoctor.doctor import check

    cli.add_command(check)


_register_check()


def _workload(model: str, width: int | None, height: int | None, steps: int, true_cfg_scale: float,
              negative_prompt: str, memory_limit: float | None = None, lora_specs: tuple[str, ...] = (),
              distilled_spec: str | None = None, distilled_steps: str | None = None,
              task: str = "generate", images: tuple[str, ...] = (), mask: str | None = None,
              strength: float | None = None):
    import dataclasses

    from qwendoctor import inputs, models
    from qwendoctor.levers import memory
    from qwendoctor.profile import Workload

    size = models.default_side(model)
    if true_cfg_scale is None:
        true_cfg_scale = models.default_true_cfg_scale(model, task)
    memory.check_value(memory_limit)  # named as the option, not as the workload field
    # Sizes, steps and scale first: a typo is answered before torch is imported (seconds on a small machine).
    # `is None`, not `or`: --width 0 is a mistake to name, not a request for the default.
    workload = Workload(model=model, width=size if width is None else width, height=size if height is None else height,
                        true_cfg_scale=true_cfg_scale,
                        negative_prompt=negative_prompt, reference_steps=steps, dtype="float32",
                        memory_limit_gib=memory_limit).validate()
    # The task's options, then whether this model has its pipeline, then the input files: all before torch.
    inputs.check_options(task, images, mask, strength)
    max_images = models.check_task(model, task)
    # LoRA files from their headers alone: a wrong path is answered before the model loads.
    workload = dataclasses.replace(workload, loras=_loras(lora_specs, model),
                                   distilled=_distilled(distilled_spec, distilled_steps, model)).validate()
    workload = inputs.task_workload(workload, task, images, mask, strength, max_images)
    memory.check_against_card(memory_limit, memory.card_total_gib() if memory_limit is not None else None)
    device = models.default_device()
    models.resolve_model(model, device)
    models.check_diffusers_env()
    _check_lora_keys(workload.loras + ((workload.distilled,) if workload.distilled else ()), model)
    memory.apply(memory_limit)  # before anything is loaded: the cap must see every allocation
    return dataclasses.replace(workload, dtype=models.default_dtype(device)).validate()


def _loras(specs: tuple[str, ...], model: str) -> tuple:
    from qwendoctor.levers import lora

    return tuple(lora.parse_spec(spec, model) for spec in specs)


def _distilled(spec: str | None, steps: str | None, model: str):
    from qwendoctor.levers import lora

    if spec is None:
        if steps is not None:
            raise UsageError("--distilled-steps: names the step counts of a --distilled adapter, and none is given")
        return None
    return lora.parse_distilled(spec, model, steps)


def _check_lora_keys(loras: tuple, model: str) -> None:
    """LoRAs made for another model, refused before the model loads where its config ships (tiny, synthetic);
    another model's are checked as they load."""
    from qwendoctor import models
    from qwendoctor.levers import lora

    config = models.transformer_config(model) if loras else None
    if config is not None:
        lora.check_keys_match(loras, model, config)


LORA_HELP = ("A LoRA to run with, PATH[:SCALE] (scale -10..10, default 1; repeatable); tiny:NAME is an adapter "
             "shipped with the tiny model.")
DISTILLED_HELP = ("A few-step distilled LoRA (Qwen-Image-Lightning's kind), PATH[:SCALE]: searched as a lever, run at "
                  "its step counts with CFG off and its scheduler, judged against the base model's reference; "
                  "tiny:distilled ships with the tiny model.")
DISTILLED_STEPS_HELP = ("The step counts the --distilled adapter was distilled for, e.g. 8 or 4,8 [its adapter.json; "
                        "without one, required].")
TASK_HELP = ("What to time and tune: generate (text-to-image), edit (an input image changed as the prompt says), "
             "img2img (image-to-image from --image) or inpaint (--image repainted where --mask is white).")
IMAGE_HELP = ("An input image (edit, img2img, inpaint; repeatable for an edit model that takes several) "
              "[tiny and synthetic: a drawn stand-in of the output size].")
MASK_HELP = "inpaint: the mask, the image's size, white where it is repainted [tiny and synthetic: the centre half]."
STRENGTH_HELP = "img2img and inpaint: the share of the schedule run from the input, in (0, 1] [0.6]."


def workload_options(command):
    """What tune and bench both take about the workload beyond its size: its LoRAs, a distilled adapter, the task
    and its inputs."""
    options = (
        click.option("--lora", "lora_specs", multiple=True, help=LORA_HELP),
        click.option("--distilled", "distilled_spec", help=DISTILLED_HELP),
        click.option("--distilled-steps", help=DISTILLED_STEPS_HELP),
        click.option("--task", type=click.Choice(TASKS), default="generate", show_default=True, help=TASK_HELP),
        click.option("--image", "images", multiple=True, help=IMAGE_HELP),
        click.option("--mask", help=MASK_HELP),
        click.option("--strength", type=float, help=STRENGTH_HELP),
    )
    for option in reversed(options):  # the order of --help, as if stacked as decorators
        command = option(command)
    return command


MEMORY_LIMIT_HELP = ("GiB of GPU memory this process may use (torch's per-process cap): tune and test a plan for "
                     "a smaller card, or leave room for another process [the whole card].")




@cli.command()
@click.option("--model", default="tiny", show_default=True,
              help="tiny, synthetic, a local directory, or a Hugging Face id already in the cache.")
@click.option("--width", type=int, help="Image width in pixels, a multiple of 16 [tiny: 128, else 1328].")
@click.option("--height", type=int, help="Image height in pixels, a multiple of 16 [tiny: 128, else 1328].")
@click.option("--steps", type=int, default=50, show_default=True, help="Reference denoising steps.")
@click.option("--true-cfg-scale", type=float,
              help="1 turns CFG off [4.0; tiny's edit model: the scale it was trained for].")
@click.option("--negative-prompt", default=" ", show_default=True)
@click.option("--trials", type=int, default=20, show_default=True, help="Total trials in the study.")
@click.option("--timeout", type=float, help="Stop starting new trials after this many seconds.")
@click.option("--prompts", "prompts_file", type=str, help="Prompt file, one a line [built-in set].")
@click.option("--num-prompts", type=int, default=2, show_default=True, help="Prompts taken from the built-in set.")
@click.option("--seeds", type=int, default=1, show_default=True, help="Seeds per prompt (0, 1, ...).")
@click.option("--floor", default="balanced", show_default=True,
              help="Quality floor vs the reference: lossless, balanced, fast, or psnr=DB,ssim=S.")
@click.option("--lock", "lock_path", default=DEFAULT_LOCK, show_default=True, help="Where to write the lock.")
@click.option("--storage", help="Where the study lives: sqlite:///PATH (one worker), journal:///PATH (several "
              "workers on one host) or postgresql+psycopg2://USER@HOST:PORT/DB (several hosts) "
              "[sqlite:///<lock dir>/qwendoctor-study.db].")
@click.option("--heartbeat", type=click.IntRange(min=1), default=DEFAULT_HEARTBEAT_S, show_default=True,
              help="Seconds between a worker's heartbeats; a trial silent for twice as long is run again.")
@click.option("--timed-steps", type=int, default=5, show_default=True,
              help="Denoising steps timed per trial (after a 2-step warm-up); full images are rendered only for "
                   "trials whose estimate could beat the best so far.")
@click.option("--exhaustive", is_flag=True,
              help="Also search choices measured to lose here (full compile, max-autotune, eager FP8, TF32 in "
                   "bf16); the default space lists what it leaves out.")
@click.option("--gpus", type=int, help="Also measure the best profile split over up to this many GPUs "
              "(CFG-parallel, Ulysses, ring) and lock the fastest [all visible GPUs].")
@click.option("--memory-limit", type=float, help=MEMORY_LIMIT_HELP)
@workload_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def tune(model, width, height, steps, true_cfg_scale, negative_prompt, trials, timeout, prompts_file,
         num_prompts, seeds, floor, lock_path, storage, heartbeat, timed_steps, exhaustive, gpus, memory_limit,
         lora_specs, distilled_spec, distilled_steps, task, images, mask, strength, as_json):
    """Search the optimization levers for the fastest profile that meets the quality floor; write a lock."""
    from qwendoctor import quality
    from qwendoctor.tune import TuneOptions, read_prompts

    global _resumable
    # Everything that can be checked without torch, first: a usage error in well under two seconds.
    if num_prompts < 1 or seeds < 1:
        raise UsageError("--num-prompts and --seeds must be at least 1")
    if trials < 1:
        raise UsageError(f"--trials must be at least 1, got {trials}")
    if gpus is not None and gpus < 1:
        raise UsageError(f"--gpus must be at least 1, got {gpus}")  # as generate says it
    for field, value, option in (("num_prompts", num_prompts, "--num-prompts"), ("seeds", seeds, "--seeds"),
                                 ("trials", trials, "--trials"), ("timeout", timeout, "--timeout"),
                                 ("heartbeat", heartbeat, "--heartbeat"), ("timed_steps", timed_steps,
                                                                           "--timed-steps"), ("gpus", gpus, "--gpus")):
        _in_range(field, value, option)
    from qwendoctor.storage import check_url, file_of

    if storage is not None:
        check_url(storage)
    _check_lock_destination(lock_path)
    given_storage = storage is not None
    if storage is None:
        directory = os.path.dirname(os.path.abspath(lock_path))
        storage = f"sqlite:///{os.path.join(directory, 'qwendoctor-study.db')}"
    study_file = file_of(storage)
    if study_file is not None and os.path.realpath(study_file) == os.path.realpath(lock_path):
        # Replacing the study with the lock would lose every trial: the next run finds "not a database".
        whose = f"--storage {storage}" if given_storage else "the default study database"
        raise UsageError(f"--lock {lock_path}: is the study's own file ({whose}); name another lock file")
    parsed_floor = quality.parse_floor(floor)
    _in_range("floor", parsed_floor.psnr_db, "--floor psnr")  # nan would pass every comparison, inf none
    _check_cache_dir()
    workload = _workload(model, width, height, steps, true_cfg_scale, negative_prompt, memory_limit, lora_specs,
                         distilled_spec, distilled_steps, task, images, mask, strength)
    from qwendoctor import report

    if not given_storage:
        # The default study sits beside the lock, whose folder may not exist yet (the lock's write would make it).
        os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    prompts = read_prompts(prompts_file, num_prompts, workload.model, workload.task)
    options = TuneOptions(workload=workload, prompts=prompts,
                          seeds=list(range(seeds)), floor=parsed_floor, lock_path=lock_path,
                          storage=storage, trials=trials, timeout_s=timeout, heartbeat_s=heartbeat,
                          timed_steps=timed_steps, exhaustive=exhaustive, gpus=_tune_gpus(gpus))
    options.validate()
    _resumable = True
    try:
        result = report.run_tune_with_progress(options, as_json=as_json)
    except UsageError as error:
        if given_storage or not str(error).startswith(f"--storage {storage}"):
            raise
        # The user gave no --storage: the error is about the default study file, named as such.
        raise UsageError(str(error).replace(f"--storage {storage}", f"the study database {study_file} (the "
                                            "default beside --lock; --storage names another)", 1)) from None
    if as_json:
        click.echo(report.tune_json(result))
    else:
        report.print_tune(result, lock_path)


def _check_lock_destination(lock_path: str) -> None:
    """The lock is written last, after minutes of trials: a path it cannot be written to is refused first."""
    from qwendoctor.files import check_replaceable, writable_directory

    if not lock_path.strip():
        raise UsageError("--lock is empty; name the lock file, e.g. --lock qwendoctor.lock")
    if os.path.isdir(lock_path):
        raise UsageError(f"--lock {lock_path}: is a directory; name the lock file, e.g. {lock_path}/qwendoctor.lock")
    check_replaceable(lock_path, "--lock")  # a device or a link is named as such, whatever its folder allows
    writable_directory(os.path.dirname(os.path.abspath(lock_path)), "--lock")


def _tune_gpus(asked: int | None) -> int:
    """--gpus, else every visible GPU; more GPUs than visible is a usage error (on a CPU any count runs with
    gloo, as the tests do)."""
    import torch

    from qwendoctor import parallel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    visible = torch.cuda.device_count() if device == "cuda" else 1
    if asked is None:
        return visible
    parallel.check_gpu_count(asked, device, visible)
    return asked


@cli.command()
@click.argument("prompt")
@click.option("--lock", "lock_path", default=DEFAULT_LOCK, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("--out", "out_dir", default="qwendoctor-out", show_default=True, help="Directory for the PNGs.")
@click.option("--ignore-fingerprint", is_flag=True, help="Use a lock tuned on another machine or stack.")
@click.option("--gpus", type=int, help="GPUs to split each image over, one torchrun rank each [the lock's, else 1].")
@click.option("--parallel", "strategy", type=click.Choice(PARALLEL_STRATEGIES),
              help="How --gpus share the work [the lock's; else cfg on 2 GPUs, cfg+ulysses on 4, ...].")
@click.option("--memory-limit", type=float, help=MEMORY_LIMIT_HELP.replace("[the whole card]", "[the lock's]"))
@click.option("--lora", "lora_specs", multiple=True,
              help=LORA_HELP.replace("(scale", "in place of the lock's LoRAs (scale"))
@click.option("--task", type=click.Choice(TASKS), help="The lock's task, stated: a lock of another is refused "
              "[the lock's].")
@click.option("--image", "images", multiple=True,
              help="The lock's input image, of the size it was tuned for (repeatable for an edit model that takes "
                   "several) [synthetic: a drawn stand-in].")
@click.option("--mask", help=MASK_HELP.replace("tiny and synthetic", "synthetic"))
@click.option("--strength", type=float, help=STRENGTH_HELP.replace("[0.6]", "[the lock's]"))
@click.option("--json", "as_json", is_flag=True, help="Print the written files and timings as JSON.")
def generate(prompt, lock_path, seed, num_images, out_dir, ignore_fingerprint, gpus, strategy, memory_limit,
             lora_specs, task, images, mask, strength, as_json):
    """Generate images with the tuned lock; never overwrites an existing file."""
    import dataclasses
    import json

    from qwendoctor import inputs, lockfile, parallel
    from qwendoctor.generate import build_tuned, check_fingerprint, first_image_extra_s, generate_images, warm_up

    if num_images < 1:
        raise UsageError(f"--num-images must be at least 1, got {num_images}")
    _in_range("num_images", num_images, "--num-images")  # before --seed's range, which depends on it
    # Image i uses seed + i, and torch's generators take 0 .. 2**64 - 1: checked before minutes of loading.
    if not 0 <= seed <= 2**64 - num_images:
        raise UsageError(f"--seed must be in 0..{2**64 - num_images} for {num_images} image(s) (each uses seed + "
                         f"its index), got {seed}")
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    from qwendoctor.levers import memory

    memory.check_value(memory_limit)
    from qwendoctor.files import writable_directory

    writable_directory(out_dir, "--out")  # before minutes of loading and rendering, not after
    if not lock_path.strip():
        raise UsageError("--lock is empty; name the lock file, e.g. --lock qwendoctor.lock")
    if strength is not None:
        _in_range("strength", strength, "--strength")  # before the lock: a typo is named as the option
    lock = lockfile.read_lock(lock_path)
    # The task's inputs, checked against the lock (its task, each input's size) before the model loads.
    lock = dataclasses.replace(lock, workload=inputs.for_lock(lock.workload, task, images, mask, strength,
                                                              lock_path))
    if lora_specs:
        lock = _with_loras(lock, lora_specs)
    if gpus is not None and gpus < 1:
        raise UsageError(f"--gpus must be at least 1, got {gpus}")
    _in_range("gpus", gpus, "--gpus")
    profile = parallel.with_gpus(lock.profile, lock.profile.gpus if gpus is None else gpus, strategy,
                                 lock.workload.does_cfg)
    if profile.gpus > 1 and not parallel.in_rank():
        if not ignore_fingerprint:
            check_fingerprint(lock, lock_path)
        source = "--gpus" if gpus is not None else f"{lock_path}: profile.gpus"
        _launch_generate(profile, lock, source,
                         [prompt, "--lock", os.path.abspath(lock_path), "--seed", str(seed),
                          "--num-images", str(num_images), "--out", out_dir]
                         + ["--ignore-fingerprint"] * ignore_fingerprint + ["--json"] * as_json
                         + (["--memory-limit", str(memory_limit)] if memory_limit is not None else [])
                         + [f"--lora={spec}" for spec in lora_specs]
                         + [f"--image={os.path.abspath(path)}" for path in images]
                         + ([f"--mask={os.path.abspath(mask)}"] if mask is not None else [])
                         + (["--strength", repr(strength)] if strength is not None else []))
        return
    main_rank = parallel.is_main()
    if profile.gpus > 1:
        from qwendoctor import models

        parallel.init_process_group(models.default_device())
    limit = memory_limit if memory_limit is not None else lock.workload.memory_limit_gib
    memory.check_against_card(limit, memory.card_total_gib() if limit is not None else None)
    tuned = build_tuned(lock, lock_path, ignore_fingerprint=ignore_fingerprint, profile=profile,
                        memory_limit_gib=limit)
    warm_up_s = warm_up(tuned)
    if not as_json and main_rank:
        click.echo(f"warm-up (first-call costs: lazy initialisation, compile, autotune): {warm_up_s:.2f} s")
    if lock.workload.model == "tiny" and main_rank:
        _note_tiny_grammar(prompt, lock.workload.task)
    written = []
    for path, seconds in generate_images(tuned, prompt, seed, num_images, out_dir, save=main_rank):
        written.append({"path": path, "seconds": round(seconds, 4)})
        if not as_json and main_rank:
            click.echo(f"{path}  {seconds:.2f} s")
    if profile.gpus > 1:
        parallel.destroy_process_group()
    if not main_rank:
        return
    # The first image's extra cost apart from the others': the lock's figure is a warm median.
    extra_s = first_image_extra_s([w["seconds"] for w in written])
    if as_json:
        click.echo(json.dumps({"images": written, "warm_up_s": round(warm_up_s, 4),
                               "first_image_extra_s": None if extra_s is None else round(extra_s, 4),
                               "profile": tuned.profile.to_dict()}))
    elif len(written) > 1:
        mean = sum(w["seconds"] for w in written) / len(written)
        click.echo(f"{len(written)} images, {mean:.2f} s per image; the first {extra_s:+.2f} s against the "
                   "others' median")


def _with_loras(lock, specs: tuple[str, ...]):
    """The lock with `--lora`'s LoRAs in place of its own: checked from their headers (a rank a compiled hotswap
    cannot hold is refused) before the model loads."""
    import dataclasses

    from qwendoctor.levers import lora

    given = _loras(specs, lock.workload.model)
    lora.check_hotswap_ranks(lock.workload, lock.profile, given)
    _check_lora_keys(given, lock.workload.model)
    return dataclasses.replace(lock, workload=dataclasses.replace(lock.workload, loras=given).validate())


def _note_tiny_grammar(prompt: str, task: str = "generate") -> None:
    """tiny learned one grammar of prompts; anything else it renders as some shape it knows, which would look like
    a bug without this line."""
    from qwendoctor.tiny import edit_data, shapes

    if task == "edit":
        try:
            edit_data.parse_instruction(prompt)
        except ValueError:
            click.echo(f"qwendoctor: note: tiny edits with instructions like 'make the circle red', 'make the "
                       "background green' or 'move the square to the top left' (colours "
                       f"{'/'.join(shapes.PALETTE)}, places {'/'.join(shapes.POSITIONS)}); this prompt is not one, "
                       "so the edit will not follow it", err=True)
        return
    try:
        shapes.parse(prompt)
    except ValueError:
        click.echo(f"qwendoctor: note: tiny draws prompts like {shapes.EXAMPLE_PROMPT!r} (sizes "
                   f"{'/'.join(shapes.SIZES)}, colours {'/'.join(shapes.PALETTE)}, shapes {'/'.join(shapes.SHAPES)}); "
                   "this prompt is not one, so the image will not show it", err=True)


def _launch_generate(profile, lock, option: str, arguments: list[str]) -> None:
    """Check what can be checked here (GPU count, the profile on this machine), then start the ranks. `option`:
    what set the GPU count, for the error."""
    import torch

    from qwendoctor import models, parallel, runner

    device = models.default_device()
    parallel.check_gpu_count(profile.gpus, device, torch.cuda.device_count(), option)
    runner.check_runnable(profile, lock.workload, detect_capabilities())
    parallel.launch(profile.gpus, ["qwendoctor", "generate", *arguments, "--gpus", str(profile.gpus),
                                   "--parallel", profile.parallel],
                    echo=lambda line: click.echo(line, err=True))


@cli.command()
@click.option("--model", help="synthetic (CUDA default), tiny (CPU default), a local directory or a cached HF id.")
@click.option("--width", type=int, help="Image width, a multiple of 16 [tiny: 128, else 1328].")
@click.option("--height", type=int, help="Image height, a multiple of 16 [tiny: 128, else 1328].")
@click.option("--steps", type=int, default=50, show_default=True, help="Steps of a full image (for s / image).")
@click.option("--true-cfg-scale", type=float,
              help="1 turns CFG off [4.0; tiny's edit model: the scale it was trained for].")
@click.option("--timed-steps", type=int, default=8, show_default=True,
              help="Steps rendered and timed per row (the median step is reported).")
@click.option("--full-image", is_flag=True, help="Render full --steps images per row: s / image measured end to end.")
@click.option("--no-ladder", is_flag=True, help="Only the default and the given profiles.")
@click.option("--rows", help="Comma-separated ladder row ids to run (see --list-rows); the default always runs.")
@click.option("--list-rows", is_flag=True, help="Print the ladder's row ids for this machine and exit.")
@click.option("--lock", "lock_paths", multiple=True, help="Also measure this lock's profile (repeatable).")
@click.option("--profile", "profile_texts", multiple=True,
              help="Also measure this profile, e.g. compile=regional,cfg_batching=true (repeatable).")
@click.option("--no-breakdown", is_flag=True, help="Skip the torch.profiler breakdown of one step per row.")
@click.option("--out", "out_dir", default="benchmarks", show_default=True, help="Directory for the JSON and table.")
@click.option("--name", help="File stem [bench-<model>-<W>x<H>].")
@click.option("--resume", is_flag=True, help="Keep the rows an interrupted run of this bench already wrote.")
@click.option("--memory-limit", type=float, help=MEMORY_LIMIT_HELP)
@workload_options
@click.option("--json", "as_json", is_flag=True, help="Print the result document as JSON.")
def bench(model, width, height, steps, true_cfg_scale, timed_steps, full_image, no_ladder, rows, list_rows,
          lock_paths, profile_texts, no_breakdown, out_dir, name, resume, memory_limit, lora_specs, distilled_spec,
          distilled_steps, task, images, mask, strength, as_json):
    """Measure the default and the ablation ladder on this machine; write JSON and a markdown table."""
    import json

    from qwendoctor import bench as bench_module
    from qwendoctor import lockfile, models
    from qwendoctor.profile import Profile

    from qwendoctor.profile import Workload

    # The numbers first, before torch decides the default model: a typo is answered at once.
    Workload(model=model or "tiny", width=128 if width is None else width, height=128 if height is None else height,
             true_cfg_scale=4.0 if true_cfg_scale is None else true_cfg_scale,
             reference_steps=steps, dtype="float32").validate()
    from qwendoctor import inputs

    inputs.check_options(task, images, mask, strength)
    from qwendoctor.files import writable_directory
    from qwendoctor.levers import memory

    memory.check_value(memory_limit)
    writable_directory(out_dir, "--out")  # as generate does: before the ladder, not after it
    given = []
    for path in lock_paths:
        given.append((f"lock {os.path.basename(path)}", lockfile.read_lock(path).profile))
    for text in profile_texts:
        given.append((text, Profile.from_text(text)))
    bench_module.BenchOptions(workload=Workload(model="tiny", width=128, height=128, dtype="float32"),
                              timed_steps=timed_steps, given=tuple(given), name=name).validate()
    _check_cache_dir()
    model = model or ("synthetic" if models.default_device() == "cuda" else "tiny")
    workload = _workload(model, width, height, steps, true_cfg_scale, " ", memory_limit, lora_specs, distilled_spec,
                         distilled_steps, task, images, mask, strength)

    def log(message: str) -> None:
        click.echo(f"qwendoctor: {message}", err=True)

    capabilities = probe_capabilities(log, workload)
    known = ([r.id for r in bench_module.alone_rungs(capabilities, workload)]
             + [step.id for step in bench_module.STACK if step.applies(capabilities, workload)])
    if list_rows:
        click.echo("\n".join(["default", *known]))
        return
    wanted = tuple(filter(None, (r.strip() for r in (rows or "").split(","))))
    for rung_id in wanted:
        if rung_id not in known and rung_id != "default":
            raise UsageError(f"--rows: unknown row {rung_id!r} here; rows: {', '.join(known)}")
    options = bench_module.BenchOptions(workload=workload, timed_steps=timed_steps, full_image=full_image,
                                        ladder=not no_ladder, rows=wanted, given=tuple(given),
                                        breakdown=not no_breakdown, out_dir=out_dir, name=name,
                                        resume=resume).validate()
    command = "qwendoctor bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
    result = bench_module.run_bench(options, capabilities, log=log, command=command.strip())
    if as_json:
        click.echo(json.dumps(bench_module._finite(result.document), indent=2, default=str))
    else:
        click.echo(bench_module.markdown(result.document))
        click.echo(f"wrote {result.path_json} and {result.path_md}")


def _fail(message: str, code: int) -> int:
    """Print the one-line error; inside a multi-GPU rank, also leave it for the launcher to report."""
    from qwendoctor import parallel

    click.echo(f"qwendoctor: error: {message}", err=True)
    parallel.report_failure(message, code)
    return code


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`, a container shutting down) as Ctrl-C: the running trial is queued
    again, temporary files are removed and the study resumes on the next run, instead of the process vanishing
    mid-write."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _terminate_like_ctrl_c() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors and documented exit codes instead of tracebacks."""
    debug = os.environ.get("QWENDOCTOR_DEBUG") == "1"
    quiet_import_noise()
    _terminate_like_ctrl_c()
    try:
        code = cli.main(args=argv, prog_name="qwendoctor", standalone_mode=False)
    except click.exceptions.Exit as done:
        code = done.exit_code
    except click.UsageError as error:
        # click's usage errors name the option already ("Invalid value for '--width': ...").
        click.echo(f"qwendoctor: error: {error.format_message()}", err=True)
        code = EXIT_USAGE
    except (click.Abort, KeyboardInterrupt) as stop:
        # click turns Ctrl-C (and Terminated, a KeyboardInterrupt) into Abort, keeping it as the cause.
        terminated = isinstance(stop, Terminated) or isinstance(stop.__cause__, Terminated)
        resumes = "; a tune resumes where it stopped when rerun" if _resumable else ""
        click.echo(f"qwendoctor: {'terminated' if terminated else 'interrupted'}{resumes}", err=True)
        code = 128 + signal.SIGTERM if terminated else 130
    except QwendoctorError as error:
        if debug:
            raise
        code = _fail(str(error), error.exit_code)
    except limits.RangeError as error:  # a size, step count or CFG scale out of range (a WorkloadError too)
        if debug:
            raise
        code = _fail(str(error), EXIT_USAGE)
    except Exception as error:  # a bug or an environment failure we did not classify
        if debug:
            raise
        from qwendoctor.models import root_cause

        # diffusers and transformers re-raise import failures as "... (look up to see its traceback)", with the
        # reason chained below: the reason is the line worth printing.
        shown = root_cause(error) if "look up to see its traceback" in str(error) else error
        code = _fail(f"{exc_line(shown)} (QWENDOCTOR_DEBUG=1 for the traceback)", EXIT_FAILURE)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
