"""The multi-GPU levers: context parallelism (Ulysses, ring) and CFG parallelism, the strategies that split one
generation over several GPUs. One family: a single `parallel` strategy and its `gpus` name both, and both run over
one device mesh.

    cfg          true CFG's cond and uncond passes on two GPUs, one all_gather of the two predictions per step
    ulysses      diffusers' context parallelism: the sequence split over the GPUs, an all-to-all around attention
                 (qwendoctor's own, compiled into each block: context_parallel_attention)
    ring         the same split, keys and values passed around a ring (needs a backend that returns the LSE)
    cfg+ulysses  two groups, one per CFG pass, each splitting its pass's sequence; cfg+ring likewise

The ranks form one device mesh, dims ("cfg", "ring", "ulysses") of shape (cfg degree, ring, ulysses): the CFG
exchange runs over the "cfg" dim, diffusers' context parallelism over the other two (ContextParallelConfig's
`mesh` argument), so the two compose. Context parallelism is applied before compile, which traces its hooks; CFG
parallelism last, like CFG batching, whose interception it shares. Starting the ranks (torchrun, the process
group) is qwendoctor.parallel's job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from probes.backends import RING_BACKENDS, ULYSSES_BACKENDS
from qwendoctor.errors import QwendoctorError, UnavailableLever, UsageError
from qwendoctor.levers.base import Field, Lever, has_transformer
from qwendoctor.levers.cfg_batching import CFGBatching, enable

if TYPE_CHECKING:
    from qwendoctor.profile import Profile

MESH_DIMS = ("cfg", "ring", "ulysses")
_meshes: dict = {}


def forget_meshes() -> None:
    """Called when the process group ends: its meshes end with it."""
    _meshes.clear()


def device_mesh(profile: "Profile"):
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


def apply_context_parallel(pipe, profile: "Profile"):
    """diffusers' context parallelism over the mesh's (ring, ulysses) dims, with Qwen-Image's own plan.

    Always the "anything" variants: Qwen-Image's sequence rarely splits evenly (6889 image tokens at 1328x1328,
    a prompt-dependent text length), and padding would need a mask, which forces slower attention kernels."""
    if not has_transformer(pipe, profile, "parallel", profile.context_degree > 1) or profile.context_degree == 1:
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


def apply_cfg_parallel(pipe, profile: "Profile"):
    """Last lever, like CFG batching: it wraps the call the pipeline makes, around everything else."""
    if not has_transformer(pipe, profile, "parallel", profile.cfg_degree == 2) or profile.cfg_degree == 1:
        return pipe
    group = device_mesh(profile)["cfg"].get_group()
    enable(pipe, lambda transformer: CFGParallelTransformer(transformer, group))
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


# ---- the levers ------------------------------------------------------------------------------------------

# cfg: true CFG's two passes on two GPUs; ulysses / ring: diffusers' context parallelism, the sequence split over
# the GPUs; cfg+X: two groups of GPUs, one per CFG pass, X inside each. `tune --gpus` measures them after the
# study (qwendoctor.strategies), so they are not dimensions of the search.
PARALLEL_STRATEGIES = ("none", "cfg", "ulysses", "ring", "cfg+ulysses", "cfg+ring")


def _parallel_check(profile) -> None:
    if profile.parallel == "none":
        if profile.gpus != 1:
            raise UsageError(f"profile.gpus: {profile.gpus} GPUs need a parallel strategy "
                             f"({', '.join(PARALLEL_STRATEGIES[1:])})")
        return
    if profile.parallel == "cfg" and profile.gpus != 2:
        raise UsageError(f"profile.gpus: parallel 'cfg' runs the two CFG passes on exactly 2 GPUs, got "
                         f"{profile.gpus}; use cfg+ulysses or cfg+ring for more")
    if "+" in profile.parallel and (profile.gpus < 4 or profile.gpus % 2):
        raise UsageError(f"profile.gpus: parallel {profile.parallel!r} needs an even count >= 4 (2 CFG groups of "
                         f">= 2 GPUs), got {profile.gpus}")
    if profile.gpus < 2:
        raise UsageError(f"profile.gpus: parallel {profile.parallel!r} needs at least 2 GPUs, got {profile.gpus}")
    if profile.cfg_degree == 2 and profile.cfg_batching:
        raise UsageError(f"profile.cfg_batching: parallel {profile.parallel!r} already runs the two CFG passes on "
                         "separate GPUs; set cfg_batching = false")
    if profile.parallel == "ring" and profile.cfg_batching:
        # CFG batching masks the shorter of the two prompts; diffusers' ring attention for sequences that do not
        # split evenly (ring_anything) refuses any attention mask.
        raise UsageError("profile.cfg_batching: parallel 'ring' takes no text mask, which CFG batching needs for "
                         "prompts of different lengths; set cfg_batching = false")
    if profile.context_degree > 1 and profile.compile == "full":
        # The whole model would trace diffusers' output gather, which Dynamo cannot (see
        # _attention_outside_compiled_graphs); regional compile leaves it outside the compiled blocks.
        raise UsageError(f"profile.compile: parallel {profile.parallel!r} takes compile = regional, not full")


def _parallel_runnable(profile, workload, capabilities) -> None:
    if profile.cfg_degree == 2 and not workload.does_cfg:
        raise UsageError(f"profile.parallel {profile.parallel!r} splits true CFG's two passes; this workload has no "
                         f"CFG (true_cfg_scale {workload.true_cfg_scale:g})")
    if profile.context_degree > 1:
        backends = RING_BACKENDS if profile.parallel.endswith("ring") else ULYSSES_BACKENDS
        if profile.attention_backend not in backends:
            raise UnavailableLever(f"parallel {profile.parallel!r} needs an attention backend diffusers can split "
                                   f"({', '.join(backends)}), not {profile.attention_backend!r}")
    if capabilities.gpu_count is not None and profile.gpus > capabilities.gpu_count:
        raise UsageError(f"profile.gpus: {profile.gpus} GPUs asked for, {capabilities.gpu_count} visible")


CONTEXT_PARALLEL = Lever(
    name="context_parallel", apply=apply_context_parallel, undoable=False, captures_profile=True,
    fields=(Field("parallel", str, "none", choices=PARALLEL_STRATEGIES, omit_default=True),
            Field("gpus", int, 1, low=1, omit_default=True)),
    check=_parallel_check, runnable=_parallel_runnable,
    describe=lambda p: f"parallel={p.parallel}/{p.gpus}" if p.parallel != "none" else None,
)


# Its fields (parallel, gpus) are the context-parallel lever's: one strategy names both.
CFG_PARALLEL = Lever(name="cfg_parallel", apply=apply_cfg_parallel, undoable=False, captures_profile=True)
