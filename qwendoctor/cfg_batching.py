"""CFG batching: the cond and uncond transformer passes of a true-CFG step as one batch-2 call.

QwenImagePipeline calls its transformer twice a step (prompt, then negative prompt) with the same latents. Two
batch-1 passes read every weight twice and launch every kernel twice; one batch-2 pass reads them once and
gives the GEMMs twice the rows. The pipeline's loop is left untouched: `pipe.transformer` becomes a
`CFGBatchedTransformer` that runs both passes when the cond call arrives and answers the uncond call from
what it kept. It recognises the two calls by identity (the very embeddings `encode_prompt` returned, the very
latents tensor of this step), so any call it does not recognise simply runs as diffusers would run it.
"""

from __future__ import annotations

from typing import Any


class CFGBatchedTransformer:
    """Stands in for the pipeline's transformer; everything but the call is the wrapped model's.

    Not an nn.Module on purpose: `compile()`, `set_attention_backend()`, `enable_cache()` and the rest must
    reach the real transformer, and the pipeline's module bookkeeping (`.to()`, offload hooks) must keep
    seeing the real one in its config.
    """

    def __init__(self, transformer):
        self.__dict__["inner"] = transformer
        self.__dict__["_encoded"] = []  # the last two (embeds, mask) that encode_prompt returned
        self.__dict__["_kept"] = None  # (latents, negative embeds, uncond output) of the batched call
        self.__dict__["batched_calls"] = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)

    def record_encoding(self, result):
        """Called with each `encode_prompt` result. A pipeline call encodes its prompt, then, only when true
        CFG is on, its negative prompt: so a cond pass whose text is the second-to-last encoding has its
        negative in the last one. Without CFG the cond text is the last encoding, and nothing is batched."""
        self.__dict__["_encoded"] = [*self._encoded[-1:], result]
        return result

    def __call__(self, *args, **kwargs):
        if args or len(self._encoded) != 2:
            return self.inner(*args, **kwargs)
        (prompt_embeds, prompt_mask), (negative_embeds, negative_mask) = self._encoded
        text = kwargs.get("encoder_hidden_states")
        kept = self._kept
        if kept is not None and text is negative_embeds and kwargs.get("hidden_states") is kept[0]:
            self.__dict__["_kept"] = None
            return kept[1]
        if text is not prompt_embeds:
            return self.inner(**kwargs)
        cond, uncond = self._batched(kwargs, negative_embeds, negative_mask)
        self.__dict__["_kept"] = (kwargs["hidden_states"], uncond)
        self.__dict__["batched_calls"] += 1
        return cond

    def _batched(self, kwargs: dict[str, Any], negative_embeds, negative_mask):
        import torch

        batch = kwargs["hidden_states"].shape[0]
        text, mask = _pad_text_pair(kwargs["encoder_hidden_states"], kwargs.get("encoder_hidden_states_mask"),
                                    negative_embeds, negative_mask)
        both = dict(kwargs)
        both["hidden_states"] = torch.cat([kwargs["hidden_states"]] * 2)
        both["encoder_hidden_states"] = text
        both["encoder_hidden_states_mask"] = mask
        for name in ("timestep", "guidance"):
            if kwargs.get(name) is not None and kwargs[name].ndim > 0:
                both[name] = torch.cat([kwargs[name].expand(batch)] * 2)
        if kwargs.get("img_shapes") is not None:
            both["img_shapes"] = list(kwargs["img_shapes"]) * 2
        output = self.inner(**both)
        if isinstance(output, tuple):
            return (output[0][:batch], *output[1:]), (output[0][batch:], *output[1:])
        cond, uncond = type(output)(sample=output.sample[:batch]), type(output)(sample=output.sample[batch:])
        return cond, uncond


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


def enable(pipe, wrap=CFGBatchedTransformer) -> CFGBatchedTransformer:
    """Install `wrap(transformer)` (CFG batching's wrapper, or one that shares its interception, such as
    qwendoctor.parallel's CFG-parallel one) over the pipeline's transformer."""
    if isinstance(pipe.transformer, CFGBatchedTransformer):
        return pipe.transformer
    wrapper = wrap(pipe.transformer)
    original_encode = pipe.encode_prompt

    def encode_prompt(*args, **kwargs):
        return wrapper.record_encoding(original_encode(*args, **kwargs))

    # Plain attribute writes: DiffusionPipeline.__setattr__ would re-register the wrapper as a pipeline
    # component in the config, which should keep naming diffusers' transformer class.
    object.__setattr__(pipe, "encode_prompt", encode_prompt)
    object.__setattr__(pipe, "transformer", wrapper)
    return wrapper


def unwrapped(transformer):
    """The diffusers transformer behind CFG batching's wrapper, if there is one."""
    return transformer.inner if isinstance(transformer, CFGBatchedTransformer) else transformer


def disable(pipe) -> None:
    if isinstance(pipe.transformer, CFGBatchedTransformer):
        object.__setattr__(pipe, "transformer", pipe.transformer.inner)
        pipe.__dict__.pop("encode_prompt", None)
