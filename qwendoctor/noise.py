"""Library noise that says nothing about the user's setup, silenced the same way for the CLI and the Python API."""

from __future__ import annotations

import logging
import os


def quiet_import_noise() -> None:
    """torchao and diffusers log warnings while being imported (enum registration, optional tensor types) that
    say nothing about the user's setup; `check` reports what matters instead. Only these loggers are touched."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # torchao names its optional CUDA extensions it cannot load; on a CPU machine that is expected.
    logging.getLogger("torchao").setLevel(logging.ERROR)
