"""LoRAs: the workload's adapters, loaded with diffusers' own loader (peft underneath), and the two ways to hold
them, as the `lora_mode` lever.

Users of Qwen-Image run it with LoRAs, and how they are held decides both speed and what can follow:

- `unfused` (diffusers' default): peft layers beside each adapted Linear, an extra small GEMM pair per Linear and
  call. Set up with diffusers' `enable_lora_hotswap(target_rank=...)` before the first load, so a compiled
  transformer takes another LoRA of the same or lower rank (`hotswap`) without a new graph.
- `fused`: loaded, scaled, `fuse_lora()` into the base weights, `unload_lora_weights()`: no peft layer left, the
  transformer costs what it cost without a LoRA. Applied before fused q/k/v (which replaces the Linears peft
  wraps), quantization (fusing into bf16 weights, then quantizing, avoids the grid artifacts users report of an
  FP8 base with a bf16 LoRA beside it) and compile.

The files are checked from their safetensors header alone, before any model loads: missing, not safetensors, no
LoRA tensors in it, a scale out of range. Keys that match no module of this model are found once the transformer
exists, before anything is loaded into it. A workload without LoRAs leaves the lever inert and unsearched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import warnings
from typing import TYPE_CHECKING, Any

from probes import limits
from probes.workload import LoRA
from qwendoctor.errors import UsageError
from qwendoctor.levers.base import BenchRow, Field, LadderStep, Lever, Offer, SpaceContext, has_transformer

if TYPE_CHECKING:
    from qwendoctor.profile import Profile, Workload

LORA_MODES = ("unfused", "fused")
BUILTIN_PREFIX = "tiny:"
# The tiny model's shipped adapters (qwendoctor.tiny.adapters): <name>/WEIGHT_NAME beside <name>/METADATA_NAME.
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_NAME = "adapter.json"
# A LoRA's header lists its tensors: a few hundred bytes each, so a 60-block rank-64 adapter's is well under 1 MiB.
# Past this bound the first 8 bytes are not a safetensors length (a zip, an image, a checkpoint of pickles).
MAX_HEADER_BYTES = 16 * 2**20
ADAPTER_PREFIX = "lora"  # adapter names lora0, lora1, ...: the same names, so a hotswap finds them again


# -- what the command line gives ----------------------------------------------------------------------------------

def parse_spec(text: str, model: str, option: str = "--lora") -> LoRA:
    """`PATH[:SCALE]` as a checked LoRA entry (sha256 and rank read from the file), before torch is imported."""
    path, scale = _split_scale(text, option)
    file = resolve(path, model, option)
    rank = inspect_header(file, f"{option} {path}")
    stored = path if path.startswith(BUILTIN_PREFIX) else os.path.abspath(path)
    lora = LoRA(path=stored, scale=scale, sha256=file_sha256(file), rank=rank).validate(f"{option} {path}")
    check_not_distilled(lora, model, option)
    return lora


def _split_scale(text: str, option: str) -> tuple[str, float]:
    path, sep, tail = text.rpartition(":")
    if not sep or not path:
        return text, 1.0
    try:
        scale = float(tail)
    except ValueError:
        return text, 1.0  # "tiny:frame": the colon belongs to the name
    try:
        limits.check("lora_scale", scale, label=f"{option} {path}: the scale")
    except limits.RangeError as error:
        raise UsageError(str(error)) from None
    return path, scale


def builtin_directory(name: str) -> str:
    from importlib import resources

    return str(resources.files("qwendoctor.tiny").joinpath("adapters", name))


def builtin_names() -> list[str]:
    from importlib import resources

    root = resources.files("qwendoctor.tiny").joinpath("adapters")
    if not root.is_dir():
        return []
    return sorted(entry.name for entry in root.iterdir() if entry.joinpath(WEIGHT_NAME).is_file())


def resolve(path: str, model: str, option: str = "--lora") -> str:
    """The file a LoRA path names: `tiny:<name>` is an adapter shipped with the tiny model."""
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX):]
    if model != "tiny":
        raise UsageError(f"{option} {path}: names an adapter shipped with the tiny model, and the model is {model}")
    file = os.path.join(builtin_directory(name), WEIGHT_NAME)
    if not name or "/" in name or not os.path.isfile(file):
        raise UsageError(f"{option} {path}: no such tiny adapter; shipped: {', '.join(builtin_names()) or 'none'}")
    return file


def inspect_header(file: str, label: str) -> int | None:
    """The LoRA's rank, from the safetensors header alone (8 bytes of little-endian length, then JSON): a file
    that is missing, not a regular file, not safetensors or holds no LoRA tensors is refused in one line."""
    header = read_header(file, label)
    shapes = {key: value.get("shape") for key, value in header.items()
              if key != "__metadata__" and isinstance(value, dict)}
    down = [shape[0] for key, shape in shapes.items()
            if (".lora_A." in key or ".lora_down." in key) and isinstance(shape, list) and shape]
    if not any(".lora" in key for key in shapes):
        raise UsageError(f"{label}: holds no LoRA tensors (no lora_A/lora_B or lora_down/lora_up keys); is it a "
                         "full checkpoint?")
    return max(down) if down else None


def read_header(file: str, label: str) -> dict[str, Any]:
    try:
        descriptor = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UsageError(f"{label}: no such file") from None
    except OSError as error:
        raise UsageError(f"{label}: {error.strerror or error}") from None
    with open(descriptor, "rb", closefd=True) as handle:
        mode = os.fstat(descriptor)
        if not stat.S_ISREG(mode.st_mode):
            raise UsageError(f"{label}: not a regular file")
        size = mode.st_size
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise UsageError(f"{label}: not a safetensors file (its first 8 bytes are no header length)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError):
            header = None
    if not isinstance(header, dict):
        raise UsageError(f"{label}: not a safetensors file (its header is not a JSON table)")
    return header


def file_sha256(file: str) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def metadata(file: str) -> dict[str, Any]:
    """The adapter's declaration (`adapter.json` beside its weights, the tiny adapters' format), {} if none."""
    beside = os.path.join(os.path.dirname(file), METADATA_NAME)
    if not os.path.isfile(beside):
        return {}
    try:
        data = json.loads(open(beside, encoding="utf-8").read(2**20))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_not_distilled(lora: LoRA, model: str, option: str = "--lora") -> None:
    """A distilled adapter needs its step counts, CFG off and its scheduler: run as a style LoRA it would
    silently draw badly. `--distilled` runs it as declared (the distilled lever)."""
    if metadata(resolve(lora.path, model, option)).get("kind") == "distilled":
        raise UsageError(f"{option} {lora.path}: is a distilled few-step adapter (its adapter.json says so); "
                         f"pass it with --distilled, which runs it at its step counts with CFG off and its scheduler")


def parse_distilled(text: str, model: str, steps_text: str | None = None, option: str = "--distilled"):
    """`PATH[:SCALE]` of a few-step distilled LoRA, with what it must run with: from its adapter.json where it has
    one (the tiny adapters' format), else `--distilled-steps` and Qwen-Image-Lightning's scheduler. Checked from
    the files alone, before torch is imported."""
    from probes.workload import Distilled, WorkloadError, scheduler_pairs
    from qwendoctor.levers.distilled import LIGHTNING_SCHEDULER

    path, scale = _split_scale(text, option)
    file = resolve(path, model, option)
    rank = inspect_header(file, f"{option} {path}")
    declared = metadata(file)
    if declared and declared.get("kind") != "distilled":
        raise UsageError(f"{option} {path}: its adapter.json declares kind {declared.get('kind')!r}, not a distilled "
                         "adapter; pass it with --lora")
    if steps_text is not None:
        steps = parse_steps(steps_text)
    elif declared.get("steps"):
        steps = declared["steps"]
    else:
        raise UsageError(f"{option} {path}: nothing declares the step counts it was distilled for; pass "
                         "--distilled-steps N (Qwen-Image-Lightning's files name theirs: 4steps, 8steps)")
    scheduler = declared.get("scheduler", LIGHTNING_SCHEDULER) if declared else LIGHTNING_SCHEDULER
    if not isinstance(scheduler, dict):
        raise UsageError(f"{option} {path}: its adapter.json's scheduler must be a table of config overrides")
    stored = path if path.startswith(BUILTIN_PREFIX) else os.path.abspath(path)
    try:
        return Distilled(path=stored, scale=scale, sha256=file_sha256(file), rank=rank,
                         steps=tuple(steps) if isinstance(steps, list) else steps,
                         scheduler=scheduler_pairs(scheduler)).validate(f"{option} {path}")
    except WorkloadError as error:
        raise UsageError(str(error)) from None


def parse_steps(text: str) -> tuple[int, ...]:
    """`--distilled-steps 4` or `4,8`."""
    try:
        steps = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--distilled-steps {text!r}: use step counts separated by commas, such as 8 or 4,8") from None
    for value in steps:
        try:
            limits.check("steps", value, label="--distilled-steps")
        except limits.RangeError as error:
            raise UsageError(str(error)) from None
    return tuple(dict.fromkeys(steps))


def check_files(workload: "Workload", where: str) -> None:
    """Each LoRA of a lock's workload is still the file it was tuned with (sha256), before the model loads."""
    for lora in workload.loras + ((workload.distilled,) if workload.distilled is not None else ()):
        label = f"{where}: LoRA {lora.path}"
        file = resolve(lora.path, workload.model, label)
        if not os.path.isfile(file):
            raise UsageError(f"{label}: the file is missing; restore it, or pass --lora to use another")
        found = file_sha256(file)
        if found != lora.sha256:
            raise UsageError(f"{label}: the file changed since the lock was tuned (sha256 {lora.sha256[:12]}..., "
                             f"now {found[:12]}...); re-run `qwendoctor tune`, or pass --lora to use it as it is")


def check_hotswap_ranks(locked: "Workload", profile: "Profile", given: tuple[LoRA, ...]) -> None:
    """Under a compiled unfused profile the LoRA weights are padded to the lock's largest rank: a LoRA of a larger
    rank does not fit that graph. Refused from the header, before the model loads."""
    if profile.lora_mode != "unfused" or profile.compile == "none" or not locked.loras:
        return
    target = compiled_rank(locked.loras)
    for lora in given:
        if lora.rank is not None and target is not None and lora.rank > target:
            raise UsageError(f"--lora {lora.path}: rank {lora.rank} is larger than the rank {target} the lock's "
                             "compiled LoRA layers hold (lora_mode=unfused hotswaps up to it); tune with it, or "
                             "use a lock with lora_mode=fused")


def compiled_rank(loras: tuple[LoRA, ...]) -> int | None:
    ranks = [lora.rank for lora in loras if lora.rank is not None]
    return max(ranks) if ranks else None


# -- applying it --------------------------------------------------------------------------------------------------

def apply_lora(pipe, profile: "Profile"):
    """Load the workload's LoRAs (optimize() hands the workload to the pipeline) and hold them as `lora_mode`
    says. What the transformer already holds is recorded on it, so re-applying is a no-op, unfused LoRAs can still
    be fused, and a fused transformer is never asked to unfuse (the pool gives it a fresh one: undoable=False)."""
    workload = getattr(pipe, "_qwendoctor_workload", None)
    loras = held_loras(workload, profile)
    if not loras or not has_transformer(pipe, profile, "lora_mode", True):
        return pipe
    transformer = pipe.transformer
    wanted = (profile.lora_mode, loras)
    held = getattr(transformer, "_qwendoctor_loras", None)
    if held == wanted:
        return pipe
    if held is not None and held[0] == "fused":
        raise UsageError("profile.lora_mode: this transformer holds fused LoRAs, which cannot be taken out; "
                         "build a new pipeline")
    names = [f"{ADAPTER_PREFIX}{index}" for index in range(len(loras))]
    if held is None or held[1] != loras:
        if held is not None:
            pipe.unload_lora_weights()
        _load(pipe, loras, workload.model, names, hotswap=False)
    if profile.lora_mode == "fused":
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=names)
        pipe.unload_lora_weights()
    object.__setattr__(transformer, "_qwendoctor_loras", wanted)
    object.__setattr__(transformer, "_qwendoctor_holds_distilled", len(loras) > len(workload.loras))
    return pipe


def held_loras(workload: "Workload | None", profile: "Profile") -> tuple[LoRA, ...]:
    """The LoRAs a pipeline holds under `profile`: the workload's, and its distilled adapter where the profile
    runs it (last, so the style LoRAs keep their adapter names, lora0, lora1, ..., through a hotswap)."""
    if workload is None:
        return ()
    distilled = (workload.distilled.as_lora(),) if workload.distilled is not None and profile.distilled else ()
    return tuple(workload.loras) + distilled


def _load(pipe, loras: tuple[LoRA, ...], model: str, names: list[str], hotswap: bool,
          scales: list[float] | None = None, active: list[str] | None = None) -> None:
    """Load `loras` as adapters `names`; then `active` (default: `names`) are the adapters in use, at `scales`."""
    modules = {name for name, _ in pipe.transformer.named_modules()}
    if not hotswap and not getattr(pipe.transformer, "peft_config", None):
        target = compiled_rank(loras)
        if target is not None:
            # Before the first load and before compile (diffusers' rule): scales become tensors and the weights are
            # padded to this rank, so a later hotswap changes values, not the graph.
            pipe.enable_lora_hotswap(target_rank=target)
            object.__setattr__(pipe.transformer, "_qwendoctor_lora_rank", target)
    for lora, name in zip(loras, names):
        file = resolve(lora.path, model)
        unmatched = first_unmatched_key(read_header(file, f"LoRA {lora.path}"), modules)
        if unmatched is not None:
            raise UsageError(f"LoRA {lora.path}: made for another model: its key {unmatched!r} matches no module "
                             "of this transformer")
        with warnings.catch_warnings():
            # peft's note on a second adapter beside the first: several LoRAs at once is what was asked for.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            pipe.load_lora_weights(file, adapter_name=name, hotswap=hotswap)
    _set_scales(pipe, active or names, scales or [lora.scale for lora in loras])


def _set_scales(pipe, names: list[str], scales: list[float]) -> None:
    """diffusers' set_adapters, with each layer's scaling kept in the tensor it was in. set_adapters writes Python
    floats, and a compiled graph guards on a float's value: a new scale would be a new graph (measured on tiny:
    a hotswap at another scale compiled one more)."""
    import torch

    layers = [module for module in pipe.transformer.modules() if isinstance(getattr(module, "scaling", None), dict)]
    before = [dict(module.scaling) for module in layers]
    pipe.set_adapters(names, scales)
    for module, kept in zip(layers, before):
        for name in names:
            value = module.scaling.get(name)
            if isinstance(value, torch.Tensor) or value is None:
                continue
            if isinstance(kept.get(name), torch.Tensor):
                kept[name].fill_(value)
                module.scaling[name] = kept[name]
            else:
                module.scaling[name] = torch.tensor(value, dtype=torch.float32,
                                                    device=module.lora_A[name].weight.device)


def check_keys_match(loras: tuple[LoRA, ...], model: str, transformer_config: dict[str, Any]) -> None:
    """A LoRA made for another model, refused from its header against the transformer's module names (the
    transformer built on the meta device from its config: no weights, no memory), before the model loads."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        modules = {name for name, _ in QwenImageTransformer2DModel(**transformer_config).named_modules()}
    for lora in loras:
        unmatched = first_unmatched_key(read_header(resolve(lora.path, model), f"--lora {lora.path}"), modules)
        if unmatched is not None:
            raise UsageError(f"--lora {lora.path}: made for another model: its key {unmatched!r} matches no module "
                             f"of {model}'s transformer")


def first_unmatched_key(header: dict[str, Any], modules: set[str]) -> str | None:
    """The first LoRA key (diffusers' `transformer.<module>.lora_A.weight` format) whose module this transformer
    lacks. Keys of other formats are left to diffusers' converters, which know them."""
    for key in header:
        if key == "__metadata__" or not key.startswith("transformer."):
            continue
        module = key[len("transformer."):].split(".lora_")[0].removesuffix(".alpha")
        if module not in modules:
            return key
    return None


def hotswap(pipe, loras: tuple[LoRA, ...], model: str) -> None:
    """Put `loras` in the place of the unfused ones the pipeline holds, adapter for adapter, without a new compiled
    graph (diffusers' `load_lora_weights(..., hotswap=True)`): for users who switch LoRAs in one process."""
    transformer = pipe.transformer
    held = getattr(transformer, "_qwendoctor_loras", None)
    if held is None or held[0] != "unfused":
        raise UsageError("hotswap: this pipeline holds no unfused LoRAs (lora_mode=unfused) to swap")
    # A distilled adapter held beside the style LoRAs (last) stays: the swap is of the style LoRAs.
    distilled = held[1][-1:] if getattr(transformer, "_qwendoctor_holds_distilled", False) else ()
    styles = held[1][:len(held[1]) - len(distilled)]
    if len(loras) != len(styles):
        raise UsageError(f"hotswap: swaps adapter for adapter: {len(styles)} LoRA(s) are loaded, {len(loras)} given")
    target = getattr(transformer, "_qwendoctor_lora_rank", None)  # what the layers were padded to at first load
    for lora in loras:
        if lora.rank is not None and target is not None and lora.rank > target:
            raise UsageError(f"hotswap: LoRA {lora.path} has rank {lora.rank}, larger than the rank {target} the "
                             "loaded LoRA layers hold")
    names = [f"{ADAPTER_PREFIX}{index}" for index in range(len(held[1]))]
    _load(pipe, loras, model, names[:len(loras)], hotswap=True,
          scales=[lora.scale for lora in tuple(loras) + distilled], active=names)
    object.__setattr__(transformer, "_qwendoctor_loras", (held[0], tuple(loras) + distilled))


# -- the lever ----------------------------------------------------------------------------------------------------

# Levers that replace or wrap the Linears peft's layers sit around: with unfused LoRAs they would drop the adapter
# (fused q/k/v deletes to_q/k/v) or run it outside their kernel (FP8, the GELU epilogue, layerwise casting).
REPLACES_LINEARS = ("fused_qkv", "gelu_epilogue")


def _conflicts(profile: "Profile") -> list[str]:
    found = [f"{field}=true" for field in REPLACES_LINEARS if getattr(profile, field)]
    if profile.quantization != "none":
        found.append(f"quantization={profile.quantization}")
    if profile.weight_storage != "bf16":
        found.append(f"weight_storage={profile.weight_storage}")
    return found


def _lora_runnable(profile: "Profile", workload: "Workload", capabilities) -> None:
    if not held_loras(workload, profile) or profile.lora_mode != "unfused":
        return
    conflicts = _conflicts(profile)
    if conflicts:
        raise UsageError(f"profile.lora_mode = 'unfused' keeps peft layers around the Linears that "
                         f"{conflicts[0]} replaces; use lora_mode=fused (fused in bf16 before it)")


def _lora_offer(ctx: SpaceContext) -> Offer:
    if not ctx.workload.loras and ctx.workload.distilled is None:
        return Offer({"lora_mode": ("unfused",)})  # inert: nothing to hold
    return Offer({"lora_mode": LORA_MODES})


def _lora_sample(trial, offer: Offer, chosen: dict[str, Any], ctx: SpaceContext) -> dict[str, Any]:
    values = offer.values["lora_mode"]
    if len(values) < 2 or not (ctx.workload.loras or chosen.get("distilled")):
        return {}  # no LoRA held in this trial: how to hold one is moot
    if _conflicts(_Chosen(chosen)):
        return {"lora_mode": "fused"}  # the only way to hold a LoRA under what was drawn before
    return {"lora_mode": trial.suggest_categorical("lora_mode", values)}


@dataclasses.dataclass
class _Chosen:
    """A trial's draws so far, read as a profile by `_conflicts` (defaults for what was not drawn)."""

    values: dict[str, Any]

    def __getattr__(self, field: str) -> Any:
        defaults = {"fused_qkv": False, "gelu_epilogue": False, "quantization": "none", "weight_storage": "bf16"}
        return self.values.get(field, defaults[field])


LORA = Lever(
    name="lora", apply=apply_lora, undoable=False,
    fields=(Field("lora_mode", str, "unfused", choices=LORA_MODES, omit_default=True),),
    runnable=_lora_runnable, offer=_lora_offer, sample=_lora_sample,
    describe=lambda p: "lora-fused" if p.lora_mode == "fused" else None,
    bench_alone=lambda capabilities, workload: (
        [BenchRow("lora_fused", "LoRAs fused into the weights", {"lora_mode": "fused"})] if workload.loras else []),
    # First in the stack: fused q/k/v and FP8 later in it need the LoRAs fused.
    ladder=(LadderStep(0, "stack:+lora_fused", "+ LoRAs fused into the weights",
                       lambda profile: dataclasses.replace(profile, lora_mode="fused"),
                       lambda capabilities, workload: bool(workload.loras)),),
)
