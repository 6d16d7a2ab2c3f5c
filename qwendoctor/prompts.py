"""The prompts a study renders, and the held-out ones its winner is checked on.

A study's images come from the user's prompt file or the built-in set (`qwendoctor/prompts.txt`; `tiny` has its
own grammar and draws from its held-out scenes); the held-out check takes prompts and seeds no study image used,
and says so when none are left.
"""

from __future__ import annotations

from qwendoctor import files
from qwendoctor.errors import UsageError


def default_prompts(model_id: str, task: str = "generate") -> list[str]:
    """The built-in prompt set for `model_id`: tiny's held-out shapes prompts (it draws nothing else), for a tiny
    edit the instructions of its stand-in input, else qwendoctor/prompts.txt."""
    if model_id == "tiny" and task == "edit":
        return tiny_edit_instructions()
    if model_id == "tiny":
        from qwendoctor.tiny import shapes, trained

        return shapes.held_out_prompts(trained.read_config()["training"]["seed"])
    from importlib import resources

    return _prompt_lines(resources.files("qwendoctor").joinpath("prompts.txt").read_text())


def tiny_edit_instructions() -> list[str]:
    """Every edit of the scene tiny's stand-in input draws (qwendoctor.inputs: shapes.EXAMPLE_PROMPT), the three
    kinds taken in turn, so that a study's first prompts and the held-out ones from the back each mix recolouring
    the shape, recolouring the background and moving it."""
    from itertools import chain, zip_longest

    from qwendoctor.tiny import edit_data, shapes

    edits = edit_data.edits_of(shapes.parse(shapes.EXAMPLE_PROMPT))
    by_kind = [[edit.instruction for edit in edits if edit.kind == kind] for kind in edit_data.KINDS]
    return [instruction for instruction in chain(*zip_longest(*by_kind)) if instruction is not None]


def _prompt_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def read_prompts(path: str | None, count: int, model_id: str = "tiny", task: str = "generate") -> list[str]:
    if path is None:
        return default_prompts(model_id, task)[:count]
    try:
        text = files.read_bounded(path, "--prompts")
    except OSError as error:
        raise UsageError(f"--prompts {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--prompts {path}: not UTF-8 text") from None
    prompts = _prompt_lines(text)
    if not prompts:
        raise UsageError(f"--prompts {path}: no prompts in the file")
    return prompts


def held_out_set(model_id: str, prompts: list[str], seeds: list[int],
                 task: str = "generate") -> tuple[list[str], list[int]]:
    """Prompts and a seed no study image used: up to as many prompts as the study used, from the back of the
    built-in set (the study takes its own from the front), and one new seed. Fewer prompts where the built-in set
    has fewer left, none where the study used them all: then the check says so, and never re-renders the study's
    own prompts as if they were new."""
    unused = [prompt for prompt in default_prompts(model_id, task) if prompt not in prompts]
    return unused[-len(prompts):] if unused else [], [max(seeds) + 1]
