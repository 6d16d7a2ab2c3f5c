"""CFG batching: the cond and uncond transformer passes of a true-CFG step as one batch-2 call.

Applied after compile: it intercepts the transformer's call, outside the compiled model. CFG parallel
(qwendoctor.levers.parallel) shares its interception with the two passes on two GPUs.

QwenImagePipeline calls its transformer twice a step (prompt, then negative prompt) with the same latents. Two
batch-1 passes read every weight twice and launch every kernel twice; one batch-2 pass reads them once and
gives the GEMMs twice the rows. The pipeline's loop is left untouched: the transformer's call runs both passes
when the cond call arrives and answers the uncond call from what it kept.

How the call is intercepted, and why so: `pipe.transformer` stays the diffusers model the pipeline registered,
so everything diffusers and the user do with a component (`.to()`, `save_pretrained`, `components`, offload
hooks, `set_attention_backend`, `compile`) reaches the real module. Only the call must be caught, and caught
outside the module's own call machinery: a forward hook or a replaced `forward` runs inside `Module.__call__`,
that is inside what `torch.compile` traces for a fully compiled model, and no hook can skip the forward the
uncond call must not run. Python looks `__call__` up on the type, so `enable` gives this one transformer a
subclass of its own class that adds nothing but `__call__`; it keeps the class's name and module, which is what
diffusers writes into `config.json` and `model_index.json`, so a saved pipeline loads back with plain diffusers.
`disable` gives the transformer its class back.

Which call is which is recognised by identity: the embeddings `encode_prompt` returned, the latents tensor of
the step. A pipeline call encodes its prompt, then, only when true CFG is on, its negative prompt; its first
cond pass (text: the second-to-last encoding) shows the call runs CFG, and from then until the next
`encode_prompt` every cond pass is batched with that negative (a `callback_on_step_end` may swap the prompt's
embeddings for new ones; the negative's cannot be swapped). The uncond call is answered only when it brings
the negative embeddings and the very latents the batched pass ran on. A call it cannot batch as one (batches
that do not line up, arguments it does not know) runs as diffusers would run it.

The two prompts rarely have the same number of tokens, and a batch needs one length. Padding the shorter and
hiding the padding with a mask moved attention off its fast kernel: on an H100 at 1024x1024 a step's attention
took 117-118 ms batched against 46.7 ms in two passes (issue 28), more than the GEMMs gain. So the text is
padded with no mask, and attention alone runs per sample: each row's queries, keys and values without its
padding (text tokens are right-padded, so that is the row's first `length` tokens and all image tokens), on
whichever kernel the attention-backend lever chose, mask-free as in two passes. Every other op of a block acts
token by token, so the padding's own rows never reach a real token, and the image tokens that leave the
transformer are those of two passes. The lengths reach attention as Python ints in a module global that is set
only while the batched pass runs: torch.compile guards on its value, as it already specialises on text length.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import TYPE_CHECKING, Any

from qwendoctor.errors import UsageError
from qwendoctor.levers.base import BenchRow, Field, LadderStep, Lever, Offer, has_transformer, runs_true_cfg

if TYPE_CHECKING:
    from qwendoctor.profile import Profile

_ATTRIBUTE = "_qwendoctor_cfg_batching"  # where the transformer keeps its CFGBatching
# Each batch row's text length while a batched pass with right-padded, unmasked text runs; None otherwise.
_text_lengths: tuple[int, ...] | None = None
_original_dispatch = None  # diffusers' dispatch_attention_fn, once per_sample_attention is installed
# The only arguments a batched pass knows how to double; a call with any other runs unbatched.
_KNOWN_ARGUMENTS = frozenset({"hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep",
                              "guidance", "img_shapes", "attention_kwargs", "return_dict"})


class CFGBatching:
    """The interception of one transformer's call: which pass is which, and the batch-2 pass."""

    def __init__(self, transformer):
        self.transformer = transformer
        self._encoded: list = []  # the last two (embeds, mask) that encode_prompt returned
        self._negative = None  # (embeds, mask) of the CFG pipeline call under way, once its first cond pass ran
        self._kept = None  # (latents, negative embeds, negative mask, uncond output) of the batched pass
        self.batched_calls = 0

    def record_encoding(self, result):
        """Called with each `encode_prompt` result: a new pipeline call (or the user's own encoding) begins."""
        self._encoded = [*self._encoded[-1:], result]
        self._negative = None
        self._kept = None
        return result

    def run(self, *args, **kwargs):
        """The transformer's own call, compiled or hooked as it is, past this interception."""
        import torch

        return torch.nn.Module.__call__(self.transformer, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        kept, self._kept = self._kept, None  # what was kept answers only the call right after the batched one
        if args or not _KNOWN_ARGUMENTS.issuperset(kwargs):
            return self.run(*args, **kwargs)
        text, latents = kwargs.get("encoder_hidden_states"), kwargs.get("hidden_states")
        if (kept is not None and text is kept[1] and latents is kept[0]
                and kwargs.get("encoder_hidden_states_mask") is kept[2]):
            return kept[3]
        if self._negative is None and len(self._encoded) == 2 and text is self._encoded[0][0]:
            self._negative = self._encoded[1]
        if self._negative is None or text is self._negative[0] or latents is None or text is None:
            return self.run(**kwargs)
        negative = _negative_for_batch(latents.shape[0], text, *self._negative)
        if negative is None:
            return self.run(**kwargs)
        cond, uncond = self._batched(kwargs, *negative)
        self._kept = (latents, *self._negative, uncond)
        self.batched_calls += 1
        return cond

    def _batched(self, kwargs: dict[str, Any], negative_embeds, negative_mask):
        import torch

        global _text_lengths

        batch = kwargs["hidden_states"].shape[0]
        prompt_embeds, prompt_mask = kwargs["encoder_hidden_states"], kwargs.get("encoder_hidden_states_mask")
        lengths = None
        if (prompt_mask is None and negative_mask is None and prompt_embeds.shape[1] != negative_embeds.shape[1]
                and getattr(self.transformer, "_parallel_config", None) is None and _install_per_sample_attention()):
            lengths = (prompt_embeds.shape[1],) * batch + (negative_embeds.shape[1],) * batch
            text, mask = _pad_text(prompt_embeds, negative_embeds), None
        else:
            text, mask = _pad_text_pair(prompt_embeds, prompt_mask, negative_embeds, negative_mask)
        both = dict(kwargs)
        both["hidden_states"] = torch.cat([kwargs["hidden_states"]] * 2)
        both["encoder_hidden_states"] = text
        both["encoder_hidden_states_mask"] = mask
        for name in ("timestep", "guidance"):
            if kwargs.get(name) is not None and kwargs[name].ndim > 0:
                both[name] = torch.cat([kwargs[name].expand(batch)] * 2)
        if kwargs.get("img_shapes") is not None:
            both["img_shapes"] = list(kwargs["img_shapes"]) * 2
        _text_lengths = lengths
        try:
            output = self.run(**both)
        finally:
            _text_lengths = None
        if isinstance(output, tuple):
            return (output[0][:batch], *output[1:]), (output[0][batch:], *output[1:])
        cond, uncond = type(output)(sample=output.sample[:batch]), type(output)(sample=output.sample[batch:])
        return cond, uncond


def _negative_for_batch(batch: int, prompt_embeds, negative_embeds, negative_mask):
    """The negative (embeds, mask) lined up with a cond pass of `batch` latents, or None where one batch cannot
    give what diffusers' two passes give. One negative for a list of prompts is what diffusers broadcasts
    inside the transformer (its text meets the image batch in the modulation): expanded here, the same rows."""
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != batch or negative_embeds.ndim != 3:
        return None
    if negative_embeds.shape[0] == batch:
        return negative_embeds, negative_mask
    if negative_embeds.shape[0] == 1 and negative_mask is None:
        return negative_embeds.expand(batch, -1, -1), None
    return None  # diffusers' own uncond pass fails on these shapes; it is left to fail the same way


def _pad_text(prompt_embeds, negative_embeds):
    """The two texts as one batch, the shorter right-padded with zeros that attention never sees."""
    import torch

    length = max(prompt_embeds.shape[1], negative_embeds.shape[1])
    return torch.cat([torch.nn.functional.pad(embeds, (0, 0, 0, length - embeds.shape[1]))
                      for embeds in (prompt_embeds, negative_embeds)])


def _attention_per_sample(query, key, value, attn_mask=None, **kwargs):
    """diffusers' dispatch_attention_fn, one batch row at a time without its text padding while a batched pass
    with padded text runs ([B, S, H, D] in and out; the padding's rows come out as zeros)."""
    lengths = _text_lengths
    if lengths is None or attn_mask is not None or query.shape[0] != len(lengths):
        return _original_dispatch(query, key, value, attn_mask=attn_mask, **kwargs)
    import torch

    padded = max(lengths)
    rows = []
    for row, length in enumerate(lengths):
        def unpadded(tensor, row=row, length=length):
            tensor = tensor[row:row + 1]
            return tensor if length == padded else torch.cat([tensor[:, :length], tensor[:, padded:]], dim=1)

        out = _original_dispatch(unpadded(query), unpadded(key), unpadded(value), attn_mask=None, **kwargs)
        if length != padded:
            out = torch.cat([out[:, :length], out.new_zeros(1, padded - length, *out.shape[2:]), out[:, length:]],
                            dim=1)
        rows.append(out)
    return torch.cat(rows)


def _install_per_sample_attention() -> bool:
    """Route Qwen-Image's joint attention through `_attention_per_sample` (it only acts while `_text_lengths` is
    set); False where diffusers' module has no dispatch_attention_fn to route (an older diffusers)."""
    global _original_dispatch
    from diffusers.models.transformers import transformer_qwenimage as qwen

    current = getattr(qwen, "dispatch_attention_fn", None)
    if current is None:
        return False
    if current is not _attention_per_sample:
        _original_dispatch = current
        qwen.dispatch_attention_fn = _attention_per_sample
    return True


def _pad_text_pair(prompt_embeds, prompt_mask, negative_embeds, negative_mask):
    """One text batch from the two: the shorter padded with zeros that its mask hides. No mask when both are
    the same length without one (diffusers drops all-ones masks so mask-free attention kernels can run)."""
    import torch

    if prompt_embeds.shape[1] == negative_embeds.shape[1] and prompt_mask is None and negative_mask is None:
        return torch.cat([prompt_embeds, negative_embeds]), None
    length = max(prompt_embeds.shape[1], negative_embeds.shape[1])
    texts, masks = [], []
    for embeds, mask in ((prompt_embeds, prompt_mask), (negative_embeds, negative_mask)):
        batch, tokens = embeds.shape[:2]
        if mask is None:
            mask = torch.ones(batch, tokens, dtype=torch.long, device=embeds.device)
        pad = length - tokens
        texts.append(torch.nn.functional.pad(embeds, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(mask.to(torch.long), (0, pad)))
    return torch.cat(texts), torch.cat(masks)


class _CallsThroughCFGBatching:
    """Put in front of a transformer's own class by `enable`: its call goes through its CFGBatching first."""

    def __call__(self, *args, **kwargs):
        return self.__dict__[_ATTRIBUTE](*args, **kwargs)

    @property
    def batched_calls(self) -> int:
        """Batch-2 passes run so far (what the bench and the GPU tests check)."""
        return self.__dict__[_ATTRIBUTE].batched_calls


_intercepting_classes: dict[type, type] = {}


def _intercepting_class(plain: type) -> type:
    if plain not in _intercepting_classes:
        # The plain class's name and module: diffusers records them for the component (config.json's
        # _class_name, model_index.json's library), and from_pretrained must find diffusers' class by them.
        _intercepting_classes[plain] = type(plain.__name__, (_CallsThroughCFGBatching, plain),
                                            {"__module__": plain.__module__, "__qualname__": plain.__qualname__,
                                             "__doc__": plain.__doc__})
    return _intercepting_classes[plain]


def interception(transformer) -> CFGBatching | None:
    """The CFGBatching (or a subclass: qwendoctor.levers.parallel's) a transformer's call goes through, if any."""
    return None if transformer is None else vars(transformer).get(_ATTRIBUTE)


def enable(pipe, wrap=CFGBatching) -> CFGBatching:
    """Send the pipeline transformer's call through `wrap(transformer)`: CFG batching's interception, or one
    that shares it, such as qwendoctor.levers.parallel's CFG-parallel one."""
    transformer = pipe.transformer
    if transformer is None:
        raise ValueError("CFG batching needs the pipeline's transformer; this pipeline has none")
    existing = interception(transformer)
    if existing is not None:
        return existing
    _forget_encode_prompt(pipe)
    batching = wrap(transformer)
    original_encode = pipe.encode_prompt
    # Weak: a transformer the pipeline lets go of (the pool's replaced one) must be freed with its batching.
    recorder = weakref.ref(batching)

    def encode_prompt(*args, **kwargs):
        result = original_encode(*args, **kwargs)
        return result if recorder() is None else recorder().record_encoding(result)

    encode_prompt._qwendoctor_records_for = recorder
    # Plain attribute writes: DiffusionPipeline.__setattr__ and Module.__setattr__ would treat these as
    # components or submodules.
    object.__setattr__(pipe, "encode_prompt", encode_prompt)
    object.__setattr__(transformer, _ATTRIBUTE, batching)
    object.__setattr__(transformer, "__class__", _intercepting_class(type(transformer)))
    return batching


def disable(pipe) -> None:
    transformer = pipe.transformer
    if interception(transformer) is not None:
        object.__setattr__(transformer, "__class__", type(transformer).__bases__[1])
        del vars(transformer)[_ATTRIBUTE]
    _forget_encode_prompt(pipe)


def _forget_encode_prompt(pipe) -> None:
    if hasattr(vars(pipe).get("encode_prompt"), "_qwendoctor_records_for"):
        del vars(pipe)["encode_prompt"]


# ---- the lever ------------------------------------------------------------------------------------------

def apply_cfg_batching(pipe, profile: "Profile"):
    if profile.cfg_batching and has_transformer(pipe, profile, "cfg_batching", True):
        enable(pipe)
    else:
        disable(pipe)
    return pipe


def _cfg_batching_runnable(profile, workload, capabilities) -> None:
    if profile.cfg_batching and not workload.does_cfg:
        raise UsageError("profile.cfg_batching batches true CFG's two passes; this workload has no CFG "
                         f"(true_cfg_scale {workload.true_cfg_scale:g})")
    if profile.cfg_batching and not runs_true_cfg(workload, profile):
        raise UsageError("profile.cfg_batching batches true CFG's two passes; the distilled adapter runs with CFG "
                         "off (distilled = true)")


def _cfg_batching_bench(capabilities, workload) -> list[BenchRow]:
    return [BenchRow("cfg_batching", "CFG batching (batch-2 pass)", {"cfg_batching": True})] if (
        workload.does_cfg) else []


CFG_BATCHING = Lever(
    name="cfg_batching", apply=apply_cfg_batching, undoable=True,
    fields=(Field("cfg_batching", bool, False),),
    runnable=_cfg_batching_runnable,
    offer=lambda ctx: Offer({"cfg_batching": (False, True) if ctx.workload.does_cfg else (False,)}),
    # With the distilled adapter drawn there is no second pass to batch.
    sample=lambda trial, offer, chosen, ctx: {} if chosen.get("distilled") else {
        "cfg_batching": trial.suggest_categorical("cfg_batching", offer.values["cfg_batching"])},
    describe=lambda p: "cfg-batch" if p.cfg_batching else None,
    bench_alone=_cfg_batching_bench,
    ladder=(LadderStep(1, "stack:+cfg_batching", "+ CFG batching",
                       lambda p: dataclasses.replace(p, cfg_batching=True), lambda c, w: w.does_cfg),),
)
