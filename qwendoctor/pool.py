"""One pipeline kept loaded across a study's trials: weights load once, and compile is paid only when its knobs
change.

Levers split in two (qwendoctor.levers, `undoable`): tf32, attention, real RoPE, caches and CFG batching are
set both ways, so any trial can re-apply them to a used pipeline; quantization, compile and the multi-GPU hooks
cannot be undone. The pool remembers what of the second kind its transformer carries (`baked_into`,
`levers.baked_part`), and per trial:

- the same baked-in part (say, the same compiled FP8 graph, another step count): re-apply the rest, reuse;
- the transformer is still bf16 and eager: apply the whole profile to it;
- otherwise: a new transformer with the original weights (`models.pristine_transformer_source`), then apply;
  or, once a lever whose state spans the pipeline (offload hooks, the text encoder's placement: `pipeline_wide`)
  was applied, a new pipeline, unless the placement is the same and leaves the transformer alone (not model or
  sequential offload): then still a new transformer only.

A compiled transformer's graph also depends on every other lever it traced (attention kernel, RoPE, batch
size through CFG batching), so a compiled profile's baked-in part is the whole profile but its steps
(`captures_profile`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from typing import Any, Callable

from qwendoctor import levers, models
from qwendoctor.profile import Capabilities, Profile, Workload, check_runnable

# `baked_into` after a failure half-way: nothing is known about the transformer, so the next trial replaces it.
UNKNOWN = {"unknown": True}


@dataclasses.dataclass
class Prepared:
    model: models.LoadedModel
    how: str  # loaded | reused | re-applied | replaced | reloaded: what the pool did for this trial
    seconds: float  # load or replace, and applying the levers (quantization lands here, compile does not)


class ModelPool:
    def __init__(self, workload: Workload, capabilities: Capabilities,
                 load: Callable[[str, str, str], models.LoadedModel] | None = None):
        self.workload = workload
        self.capabilities = capabilities
        self._load = load or models.load_model
        self.model: models.LoadedModel | None = None
        self.baked_into: dict[str, Any] | None = None
        self._pristine: Callable[[], Any] | None = None
        self._on_cpu: frozenset[str] = frozenset()  # what the loaded pipeline keeps in host memory
        self._pipeline_wide_applied: dict[str, Any] = {}  # the pipeline-wide levers' fields last applied
        self.replaced = 0  # transformers made again from the original weights
        # A pipeline-wide lever was applied (or half-applied): the pipeline itself must be built again.
        self._pipeline_touched = False

    def prepare(self, profile: Profile) -> Prepared:
        """The pipeline with `profile` applied. If this raises, the pool forgets what its transformer holds."""
        check_runnable(profile, self.workload, self.capabilities)
        started = time.perf_counter()
        wanted = levers.baked_part(profile)
        try:
            on_cpu = levers.load_on_cpu(profile)
            if self.model is None:
                self._load_with(on_cpu)
                how = "loaded"
            elif self.model.device == "cuda" and on_cpu != self._on_cpu:
                # Another placement: components the card cannot hold must load in host memory, and components
                # loaded there are not where a resident placement wants them.
                self._reload(on_cpu)
                how = "reloaded"
            elif self.baked_into is not None and self.baked_into == wanted:
                levers.optimize(self.model.pipe, profile, undoable_only=True, workload=self.workload)
                return Prepared(self.model, "reused", time.perf_counter() - started)
            elif (self.baked_into is not None and self._pipeline_touched
                  and not self._transformer_alone_changes(profile)):
                self._reload(on_cpu)
                how = "reloaded"
            elif self.baked_into is not None:
                self._replace_transformer()
                how = "replaced"
            else:
                how = "re-applied"
            self.baked_into = UNKNOWN
            self._pipeline_wide_applied = UNKNOWN  # until the levers are on: a half-applied placement is unknown
            self._pipeline_touched = self._pipeline_touched or any(
                lever.pipeline_wide and lever.is_on(profile) for lever in levers.LEVERS)
            levers.optimize(self.model.pipe, profile, workload=self.workload)
            self._pipeline_wide_applied = levers.pipeline_wide_part(profile)
            self.baked_into = wanted
        except BaseException:
            self.baked_into = UNKNOWN
            self._pipeline_wide_applied = UNKNOWN
            raise
        return Prepared(self.model, how, time.perf_counter() - started)

    def forget(self) -> None:
        """After a trial failed while running (a compile error, an OOM): the transformer's state is unknown."""
        if self.model is not None:
            self.baked_into = UNKNOWN

    def close(self) -> None:
        """Free the pipeline (and its GPU memory), for the multi-GPU stage whose ranks build their own."""
        import torch

        if self.model is not None:
            # cache-dit patches the pipeline's class and transformer with closures over the pipeline: until it
            # is disabled they keep the whole pipeline (the 58 GiB resident one) alive after the pool drops it,
            # and the multi-GPU stage's rank 0 would start on a full card. Off with every undoable lever, the
            # caches and CFG wrappers among them, as a trial's re-apply does.
            with contextlib.suppress(Exception):  # a pipeline half-applied by a failed trial: free what frees
                levers.optimize(self.model.pipe, Profile(), undoable_only=True)
        self.model, self.baked_into, self._pristine = None, None, None
        self._pipeline_touched, self._pipeline_wide_applied = False, {}
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _transformer_alone_changes(self, profile: Profile) -> bool:
        """Whether a new transformer is all `profile` needs of a pipeline whose pipeline-wide levers were applied:
        the same placement (a study's trials share the memory plan's), and none whose hooks chain the transformer
        to the other components (model or sequential offload). Then the 8B text encoder is not loaded again for
        every trial that changes what the transformer carries."""
        return (levers.pipeline_wide_part(profile) == self._pipeline_wide_applied
                and profile.offload not in ("model", "sequential"))

    def _load_with(self, on_cpu: frozenset[str]) -> None:
        self.model = self._load(self.workload.model, self.capabilities.device, self.workload.dtype, on_cpu=on_cpu,
                                task=self.workload.task)
        self._on_cpu = on_cpu
        self._pristine = models.pristine_transformer_source(self.model)

    def _reload(self, on_cpu: frozenset[str]) -> None:
        """A new pipeline: accelerate's hooks and the components' placement have no clean way back."""
        self.close()
        self._load_with(on_cpu)
        self._pipeline_touched = False

    def _replace_transformer(self) -> None:
        import torch

        pipe = self.model.pipe
        # Off with what can be undone: the CFG wrapper and the cache hooks hold the old transformer.
        levers.optimize(pipe, Profile(), undoable_only=True)
        # The old one goes first: two full transformers do not fit on an 80 GB card.
        pipe.transformer = None
        torch._dynamo.reset()  # drops the compiled graphs, which hold the old weights too
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        pipe.transformer = self._pristine()
        self.replaced += 1
