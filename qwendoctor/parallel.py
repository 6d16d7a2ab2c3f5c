"""Multi-GPU generation: one process per GPU started by torchrun, and the strategies that split the work.

    cfg          true CFG's cond and uncond passes on two GPUs, one all_gather of the two predictions per step
    ulysses      diffusers' context parallelism: the sequence split over the GPUs, an all-to-all around attention
                 (qwendoctor's own, compiled into each block: context_parallel_attention)
    ring         the same split, keys and values passed around a ring (needs a backend that returns the LSE)
    cfg+ulysses  two groups, one per CFG pass, each splitting its pass's sequence; cfg+ring likewise

The ranks form one device mesh, dims ("cfg", "ring", "ulysses") of shape (cfg degree, ring, ulysses): the CFG
exchange runs over the "cfg" dim, diffusers' context parallelism over the other two (ContextParallelConfig's
`mesh` argument), so the two compose. Every rank runs the whole pipeline (scheduler, VAE) on identical inputs
and gets identical latents back from the collectives; rank 0 alone writes images and prints.

Each strategy is one lever, `apply_<strategy>(pipe, profile)`, applied by qwendoctor.levers in its place.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from qwendoctor import files
from qwendoctor.cfg_batching import CFGBatching
from qwendoctor.errors import QwendoctorError, UsageError
from qwendoctor.profile import Profile

# torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in every rank; qwendoctor's launcher also sets ERROR_DIR_ENV, so
# that a failing rank can name its error, and so that a process knows it is one of our ranks: RANK=1 left in a
# cluster node's environment must not make `generate` believe it is a non-writing rank and write nothing.
ERROR_DIR_ENV = "QWENDOCTOR_RANK_ERRORS"
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SCRATCH_PREFIX = "qwendoctor-ranks-"  # + the launcher's pid: a folder of a launcher killed outright is found again
TIMEOUT_ENV = "QWENDOCTOR_DIST_TIMEOUT_S"
# A collective that waits longer than this fails instead of hanging. Generous: a rank may be compiling (FP8
# compiles take ~165 s on an H100) while the others already wait in the first collective.
DEFAULT_TIMEOUT_S = 900.0
MESH_DIMS = ("cfg", "ring", "ulysses")
_meshes: dict = {}


def in_rank() -> bool:
    """True inside a rank qwendoctor's launcher started (torchrun's variables and our own marker); stray RANK,
    WORLD_SIZE or LOCAL_RANK variables alone (a cluster node's, a user's shell) are ignored."""
    return ERROR_DIR_ENV in os.environ and all(name in os.environ for name in RANK_ENV)


def rank() -> int:
    if not in_rank():
        return 0
    value = os.environ["RANK"]
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"RANK={value!r}: not a rank number (the environment of a launched rank)") from None


def is_main() -> bool:
    return rank() == 0


def default_strategy(gpus: int, does_cfg: bool) -> str:
    """What `--gpus N` runs when the lock names no strategy: CFG across two groups when the workload has true
    CFG (one exchange per step instead of one per attention call), Ulysses for the rest of the split."""
    if gpus == 1:
        return "none"
    if does_cfg and gpus == 2:
        return "cfg"
    if does_cfg and gpus % 2 == 0:
        return "cfg+ulysses"
    return "ulysses"


def with_gpus(profile: Profile, gpus: int, strategy: str | None, does_cfg: bool) -> Profile:
    """`profile` run on `gpus` GPUs: the given strategy, else the profile's own if it fits, else the default.
    CFG batching gives way to the cfg strategies (both handle the same two passes) and to ring (its mask)."""
    import dataclasses

    if strategy is None:
        strategy = profile.parallel if profile.parallel != "none" and gpus > 1 else default_strategy(gpus, does_cfg)
    changed = dataclasses.replace(profile, parallel=strategy, gpus=gpus)
    if changed.cfg_degree == 2 or strategy == "ring":
        changed = dataclasses.replace(changed, cfg_batching=False)
    return changed.validate()


def dist_timeout_s() -> float:
    """$QWENDOCTOR_DIST_TIMEOUT_S, checked where it is read: a bad value named as the variable, not a ValueError
    inside every rank."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 < value <= 86_400:
        raise UsageError(f"{TIMEOUT_ENV}={text!r}: must be a number of seconds > 0 and <= 86400")
    return value


def check_gpu_count(gpus: int, device: str, visible: int, option: str = "--gpus") -> None:
    """`option`: what set the count (`--gpus`, or a lock's profile.gpus), named in the error."""
    from probes.limits import MAX_CPU_RANKS

    if gpus < 1:
        raise UsageError(f"{option} must be at least 1, got {gpus}")
    if device != "cuda" and gpus > MAX_CPU_RANKS:
        # Each CPU rank holds the whole pipeline: a million of them filled 23 GB and left orphans behind.
        raise UsageError(f"{option} {gpus}: no GPU here; at most {MAX_CPU_RANKS} CPU ranks (gloo)")
    if device == "cuda" and gpus > visible:
        raise UsageError(f"{option} {gpus}: only {visible} GPU{'s' if visible != 1 else ''} visible here "
                         "(CUDA_VISIBLE_DEVICES, nvidia-smi)")


def init_process_group(device: str) -> None:
    """Join the ranks torchrun started: NCCL for the GPUs, plus gloo for small CPU tensors (diffusers'
    Ulysses-anything exchanges the per-rank sequence lengths on the CPU, which saves a device sync per
    attention call); gloo alone on the CPU."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=dist_timeout_s())
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # No device_id: with a bound default group DeviceMesh makes its groups by ncclCommSplit instead of
        # new_group, which keeps the "cpu:gloo,cuda:nccl" pair that the size exchange's gloo half needs.
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)


def destroy_process_group() -> None:
    import torch.distributed as dist

    _meshes.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def device_mesh(profile: Profile):
    """The ranks as a (cfg, ring, ulysses) mesh; built once per shape (building one is a collective)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise QwendoctorError(f"parallel {profile.parallel!r} runs under torchrun: use `qwendoctor generate --gpus "
                              f"{profile.gpus}`, or start the process group first (qwendoctor.parallel)")
    if dist.get_world_size() != profile.gpus:
        raise QwendoctorError(f"profile.gpus is {profile.gpus}, but {dist.get_world_size()} ranks are running")
    ring = profile.context_degree if profile.parallel.endswith("ring") else 1
    shape = (profile.cfg_degree, ring, profile.context_degree // ring)
    if shape not in _meshes:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        _meshes[shape] = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    return _meshes[shape]


class CFGParallelTransformer(CFGBatching):
    """CFG batching's interception, with the batch split over two ranks: on the cond call this rank runs its
    own branch (cfg-rank 0 the prompt, 1 the negative prompt), one all_gather brings both predictions to
    both ranks, and the uncond call is answered from what was kept, as CFG batching does."""

    def __init__(self, transformer, group):
        import torch.distributed as dist

        super().__init__(transformer)
        self.group = group
        self.branch = dist.get_rank(group)

    def _batched(self, kwargs, negative_embeds, negative_mask):
        import torch
        import torch.distributed as dist

        mine = dict(kwargs)
        if self.branch == 1:
            mine["encoder_hidden_states"] = negative_embeds
            mine["encoder_hidden_states_mask"] = negative_mask
        output = self.run(**mine)
        sample = (output[0] if isinstance(output, tuple) else output.sample).contiguous()
        both = [torch.empty_like(sample) for _ in range(2)]
        dist.all_gather(both, sample, group=self.group)
        if isinstance(output, tuple):
            return (both[0], *output[1:]), (both[1], *output[1:])
        return type(output)(sample=both[0]), type(output)(sample=both[1])


def apply_context_parallel(pipe, profile: Profile):
    """diffusers' context parallelism over the mesh's (ring, ulysses) dims, with Qwen-Image's own plan.

    Always the "anything" variants: Qwen-Image's sequence rarely splits evenly (6889 image tokens at 1328x1328,
    a prompt-dependent text length), and padding would need a mask, which forces slower attention kernels."""
    if profile.context_degree == 1:
        return pipe
    from diffusers import ContextParallelConfig

    ring = profile.parallel.endswith("ring")
    mesh = device_mesh(profile)
    config = ContextParallelConfig(ring_degree=profile.context_degree if ring else 1,
                                   ulysses_degree=1 if ring else profile.context_degree,
                                   ring_anything=ring, ulysses_anything=not ring, mesh=mesh)
    with _cpu_device_count():
        pipe.transformer.enable_parallelism(config=config)
    _attention_outside_compiled_graphs()
    if not ring:
        _sizes_once_per_forward(pipe.transformer)
        _ulysses_in_compiled_graphs(pipe.transformer, mesh)
    return pipe


def split_sizes(length: int, parts: int) -> list[int]:
    """The lengths torch.tensor_split gives, which is how diffusers' "anything" sharding splits a sequence."""
    return [length // parts + (1 if index < length % parts else 0) for index in range(parts)]


class UlyssesSplit:
    """Each Ulysses rank's share of the joint (text + image) sequence, computed from the unsplit shapes at the
    start of every transformer pass. diffusers splits the image tokens and the text tokens separately and each
    rank concatenates its two shares, so a rank's length is the sum of its two tensor_split shares: every rank
    knows every rank's length without asking, and the all-to-alls need no host collective. That is what lets
    dynamo trace the attention into the compiled blocks (diffusers' version exchanges the lengths on the CPU,
    which dynamo cannot trace, so each compiled block broke in two around its attention)."""

    def __init__(self, degree: int, rank: int):
        self.degree, self.rank = degree, rank
        self.sizes: list[int] | None = None

    def before_pass(self, module, args, kwargs) -> None:
        image = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if image is None or text is None or image.dim() != 3 or text.dim() != 3:
            self.sizes = None  # an unexpected call: the attention falls back to diffusers' own exchange
            return
        self.sizes = [a + b for a, b in zip(split_sizes(image.shape[1], self.degree),
                                            split_sizes(text.shape[1], self.degree))]


_ulysses: UlyssesSplit | None = None
_eager_context_parallel_attention = None  # diffusers' function, under torch.compiler.disable


def _seq_to_heads(query, key, value, sizes: list[int], group):
    """(B, S_rank, H, D) each -> (B, S_all, H / degree, D) each: this rank's tokens of every head group go to the
    rank that owns that head group; it receives all tokens of its own heads. q, k and v travel in one
    all-to-all: one collective a block instead of three."""
    import torch
    from diffusers.models.attention_dispatch import _wait_tensor
    from torch.distributed import _functional_collectives as funcol

    batch, length, heads, dim = query.shape
    degree = len(sizes)
    x = torch.stack((query, key, value)).reshape(3, batch, length, degree, heads // degree, dim)
    x = x.permute(3, 2, 0, 1, 4, 5).contiguous().flatten(0, 1)  # (degree * S_rank, 3, B, H / degree, D)
    x = _wait_tensor(funcol.all_to_all_single(x, sizes, [length] * degree, group))  # (S_all, 3, B, H / degree, D)
    # Views, not copies: the attention ops lay q, k and v out for their kernels themselves.
    return x.permute(1, 2, 0, 3, 4).unbind(0)


def _heads_to_seq(x, sizes: list[int], rank: int, group):
    """The inverse: (B, S_all, H / degree, D) -> (B, S_rank, H, D)."""
    from diffusers.models.attention_dispatch import _wait_tensor
    from torch.distributed import _functional_collectives as funcol

    batch, _, local_heads, dim = x.shape
    degree, length = len(sizes), sizes[rank]
    x = x.permute(1, 0, 2, 3).contiguous()
    x = _wait_tensor(funcol.all_to_all_single(x, [length] * degree, sizes, group))
    x = x.reshape(degree, length, batch, local_heads, dim).permute(2, 1, 0, 3, 4)
    return x.reshape(batch, length, degree * local_heads, dim)


def context_parallel_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                               forward_op, backward_op, _parallel_config=None, **kwargs):
    """diffusers' `_templated_context_parallel_attention`, with Ulysses done here when it can be: no mask, no LSE
    asked for, heads divisible by the degree, the shares known (UlyssesSplit). Anything else goes to diffusers'
    own function, outside the compiled graph. A rank whose length is not its computed share raises."""
    split = _ulysses
    config = _parallel_config.context_parallel_config if _parallel_config is not None else None
    # Only conditions every rank shares decide the path: a rank that took the other one would wait forever in
    # a collective its peers never enter.
    if (split is None or split.sizes is None or config is None or config.ring_degree > 1
            or config.ulysses_degree != split.degree or attn_mask is not None or return_lse or enable_gqa
            or query.shape[2] % split.degree or key.shape[1] != query.shape[1]):
        return _eager_context_parallel_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                 enable_gqa, return_lse, forward_op, backward_op,
                                                 _parallel_config=_parallel_config, **kwargs)
    if query.shape[1] != split.sizes[split.rank]:
        raise RuntimeError(f"Ulysses: this rank holds {query.shape[1]} tokens, but the transformer's input shapes "
                           f"give it {split.sizes[split.rank]} (shares {split.sizes}): the model changed the "
                           "sequence length after its input")
    group = config._ulysses_mesh.get_group()
    query, key, value = _seq_to_heads(query, key, value, split.sizes, group)
    # Inference only (ctx None, nothing saved), and no parallel config: the op then skips the log-sum-exp that
    # diffusers' ring and backward passes need and this path does not.
    out = forward_op(None, query, key, value, None, dropout_p, is_causal, scale, enable_gqa, False,
                     _save_ctx=False, _parallel_config=None)
    return _heads_to_seq(out, split.sizes, split.rank, group)


def _ulysses_in_compiled_graphs(transformer, mesh) -> UlyssesSplit:
    global _ulysses
    import torch.distributed as dist
    from diffusers.models import attention_dispatch

    group = mesh["ulysses"].get_group()
    _ulysses = UlyssesSplit(dist.get_world_size(group), dist.get_rank(group))
    if not getattr(transformer, "_qwendoctor_ulysses_split", False):
        # Looks the split up when called, so a later pipeline (a new UlyssesSplit) reuses the hook.
        transformer.register_forward_pre_hook(lambda *call: _ulysses.before_pass(*call), with_kwargs=True)
        transformer._qwendoctor_ulysses_split = True
    attention_dispatch._templated_context_parallel_attention = context_parallel_attention
    return _ulysses


class SizesOncePerForward:
    """diffusers' Ulysses-anything exchanges each rank's sequence length before every all-to-all: q, k, v and
    the output of every attention call, 240 host collectives per transformer pass for 60 blocks, each one a
    point where all ranks' host threads wait for each other. The lengths cannot change within a pass (every
    block attends over the same joint sequence), so the first exchange of a pass is kept and the rest of the
    pass reuses it; a hook on the transformer forgets it when the next pass starts.

    All ranks start each pass with nothing kept, so all of them exchange on its first call and none on later
    ones: they never disagree about whether to enter the collective (diffusers warns that a cache keyed on a
    rank's own length could). A rank whose length changed within a pass, which this model never does, raises
    instead of skipping a collective the others enter."""

    def __init__(self, exchange):
        self.exchange = exchange  # diffusers' gather_size_by_comm
        self.kept: dict[int, tuple[int, list[int]]] = {}
        self.exchanges = 0  # for tests: host collectives actually made

    def forget(self, *_) -> None:
        self.kept.clear()

    def __call__(self, size: int, group) -> list[int]:
        kept = self.kept.get(id(group))
        if kept is None:
            sizes = self.exchange(size, group)
            self.exchanges += 1
            self.kept[id(group)] = (size, list(sizes))
            return sizes
        if kept[0] != size:
            raise RuntimeError(f"Ulysses: this rank's sequence length changed within a pass ({kept[0]} -> {size}); "
                               "the lengths are exchanged once per pass")
        return list(kept[1])


def _sizes_once_per_forward(transformer) -> SizesOncePerForward:
    from diffusers.models import attention_dispatch

    current = attention_dispatch.gather_size_by_comm
    if not isinstance(current, SizesOncePerForward):
        current = SizesOncePerForward(current)
        attention_dispatch.gather_size_by_comm = current  # the name the Ulysses-anything functions call
    if not getattr(transformer, "_qwendoctor_forgets_sizes", False):
        transformer.register_forward_pre_hook(current.forget)
        transformer._qwendoctor_forgets_sizes = True
    return current


def _attention_outside_compiled_graphs() -> None:
    """Dynamo cannot trace diffusers' "anything" attention (it runs the size exchange on a fake process group and
    fails). Where qwendoctor's own Ulysses attention does not apply (ring, a mask), compiled blocks break around
    diffusers' function and it runs eagerly; the projections, RoPE, norms and MLP around it still compile."""
    import torch
    from diffusers.models import attention_dispatch

    global _eager_context_parallel_attention
    function = attention_dispatch._templated_context_parallel_attention
    if function is context_parallel_attention:
        return
    if not getattr(function, "_qwendoctor_eager", False):
        eager = torch.compiler.disable(function)
        eager._qwendoctor_eager = True
        attention_dispatch._templated_context_parallel_attention = eager
        _eager_context_parallel_attention = eager
    elif _eager_context_parallel_attention is None:
        _eager_context_parallel_attention = function


def apply_cfg_parallel(pipe, profile: Profile):
    """Last lever, like CFG batching: it wraps the call the pipeline makes, around everything else."""
    if profile.cfg_degree == 1:
        return pipe
    from qwendoctor import cfg_batching

    group = device_mesh(profile)["cfg"].get_group()
    cfg_batching.enable(pipe, lambda transformer: CFGParallelTransformer(transformer, group))
    return pipe


class _cpu_device_count:
    """diffusers 0.42 picks the rank's device as `rank % torch.accelerator.device_count()`, which divides by
    zero without an accelerator. On the CPU (gloo, the tests) count the CPU as one device while it does."""

    def __enter__(self):
        import torch

        self.original = torch.accelerator.device_count
        if not torch.cuda.is_available() and self.original() == 0:
            torch.accelerator.device_count = lambda: 1

    def __exit__(self, *exc):
        import torch

        torch.accelerator.device_count = self.original


# ---- the launcher ---------------------------------------------------------------------------------------------


def report_failure(message: str, exit_code: int) -> None:
    """Called by a failing rank: leave its one-line error where the launcher looks for it."""
    directory = os.environ.get(ERROR_DIR_ENV)
    if not directory or not in_rank():
        return
    record = {"rank": rank(), "message": message, "exit_code": exit_code, "time": time.time()}
    path = os.path.join(directory, f"rank-{rank()}.json")
    try:
        files.write_text_atomic(path, json.dumps(record))
    except OSError:
        pass  # the launcher falls back to torchrun's own report


def launch(gpus: int, module_argv: list[str], echo=None) -> int:
    """Run `python -m <module_argv>` as `gpus` ranks under torchrun on this host; return 0 or raise.

    torchrun stops every rank as soon as one exits non-zero (max-restarts 0), so a failing rank ends the run
    within about a second instead of leaving the others waiting in a collective. The ranks' stderr is kept
    back; lines that start with "qwendoctor:" (rank 0's notes) are passed on through `echo`, and on failure
    the first failing rank's error line is raised.

    Nothing outlives it: torchrun's logs and the ranks' error records go to one temporary folder removed on the
    way out; torchrun dies with this process (PR_SET_PDEATHSIG, even if this one is killed outright), each rank
    with torchrun (die_with_launcher), and on Ctrl-C or SIGTERM torchrun is told to stop its ranks and waited
    for."""
    from probes.limits import MAX_CPU_RANKS, RANGES

    if not 1 <= gpus <= max(RANGES["gpus"].high, MAX_CPU_RANKS):  # callers check against the machine first
        raise UsageError(f"--gpus {gpus}: out of range")
    dist_timeout_s()  # a bad variable named here, not in every rank
    remove_stale_scratch()
    scratch = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
    errors = os.path.join(scratch, "errors")
    os.mkdir(errors)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(gpus), "--max-restarts", "0", "--monitor-interval", "0.1",
            "--log-dir", os.path.join(scratch, "logs"), "-m", *module_argv]
    env = {**os.environ, ERROR_DIR_ENV: errors}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // gpus)))
    try:
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=_parent_death_signal(signal.SIGTERM))
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    kept: list[str] = []

    def read_stderr():
        for line in proc.stderr:
            kept.append(line)
            if echo and line.startswith("qwendoctor:") and not line.startswith("qwendoctor: error:"):
                echo(line.rstrip("\n"))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached torchrun too (same process group); SIGTERM, which reached only us, did not. Either
            # way torchrun stops its ranks on SIGTERM.
            _stop(proc)
            raise
        reader.join(timeout=5)
        if code == 0:
            return 0
        if os.environ.get("QWENDOCTOR_DEBUG") == "1":
            sys.stderr.write("".join(kept))
        first = _first_failure(errors)
        if first is not None:
            raise QwendoctorError(f"rank {first['rank']}: {first['message']}", exit_code=first["exit_code"])
        raise QwendoctorError(f"torchrun exited with code {code}: {_torchrun_reason(kept)}")
    finally:
        _stop(proc)
        shutil.rmtree(scratch, ignore_errors=True)


def remove_stale_scratch() -> list[str]:
    """The temporary folders of launchers that were killed outright (no cleanup could run): those whose process
    is gone. Returns their paths."""
    import glob

    import psutil

    removed = []
    for path in glob.glob(os.path.join(glob.escape(tempfile.gettempdir()), f"{SCRATCH_PREFIX}*-*")):
        pid = os.path.basename(path)[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """torchrun, if still running: SIGTERM (it stops its ranks), then SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _parent_death_signal(sig: int):
    """A function that asks the kernel to send `sig` to the calling process when its parent dies, however it dies
    (Linux's PR_SET_PDEATHSIG; elsewhere a no-op). Resolved here, in the parent: between fork and exec a child may
    call it, but must not import anything (another thread may have held the import lock at the fork)."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None
    pr_set_pdeathsig = 1

    def request() -> None:
        if prctl is not None:
            prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)

    return request


def die_with_launcher() -> None:
    """In a rank: exit when torchrun exits. torchrun starts each rank in a session of its own, so a torchrun killed
    outright (the OOM killer, kill -9) would leave its ranks waiting in a collective for up to the timeout."""
    if not in_rank():
        return
    _parent_death_signal(signal.SIGKILL)()
    if os.getppid() == 1:  # torchrun was gone before the request took effect
        os._exit(1)


def _first_failure(directory: str) -> dict | None:
    records = []
    for name in os.listdir(directory):
        if name.endswith(".json"):
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as handle:
                    records.append(json.load(handle))
            except (OSError, ValueError):
                continue
    return min(records, key=lambda r: r["time"]) if records else None


def _torchrun_reason(lines: list[str]) -> str:
    """A rank that died without reporting (a signal, an abort in native code): torchrun's summary names it."""
    for line in lines:
        if "exitcode" in line and "local_rank" in line:
            return line.strip().split("] ", 1)[-1][:300]
    meaningful = [line.strip() for line in lines if line.strip()]
    return meaningful[-1][:300] if meaningful else "no output"


# At import: every rank imports this module within its first seconds (qwendoctor generate, qwendoctor.strategies,
# the tests' ranks), long before it can block in a collective.
die_with_launcher()
