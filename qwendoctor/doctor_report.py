"""`qwendoctor check`'s report: the findings in their fixed order, flutter-doctor style or as JSON, the exit code
they decide, and the progress line a terminal shows while the probes run. Reads findings; runs nothing.

Exit code: 0 when no finding is fail or crash, 1 otherwise (warn and skip do not fail the run).
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Sequence

from probes.finding import FAILING_STATUSES, Finding
from qwendoctor.errors import EXIT_FAILURE, EXIT_OK

SCHEMA_VERSION = 1


def exit_code(findings: Sequence[Finding]) -> int:
    """0 when no finding is fail or crash, else 1."""
    return EXIT_FAILURE if any(f.status in FAILING_STATUSES for f in findings) else EXIT_OK


MARKS = {"ok": "[✓]", "warn": "[!]", "fail": "[✗]", "skip": "[-]", "crash": "[☠]"}
ASCII_MARKS = {"ok": "[ok]", "warn": "[!]", "fail": "[x]", "skip": "[-]", "crash": "[crash]"}
ISSUE_STATUSES = ("warn", "fail", "crash")


def render(findings: Sequence[Finding], verbose: bool = False, ascii_only: bool = False) -> str:
    """flutter-doctor style report: one line per finding, its fix for warn/fail/crash, details with -v."""
    marks = ASCII_MARKS if ascii_only else MARKS
    lines = []
    for f in findings:
        line = f"{marks[f.status]} {f.id}: {f.summary}"
        if verbose and f.elapsed_s is not None:
            line += f" ({f.elapsed_s:.1f} s)"
        lines.append(line)
        if f.status in ISSUE_STATUSES and f.fix:
            lines.append(f"    fix: {f.fix}")
        if verbose:
            lines.extend(f"    • {d}" if not ascii_only else f"    - {d}" for d in f.details)
    counts = {s: sum(f.status == s for f in findings) for s in ISSUE_STATUSES}
    issues = sum(counts.values())
    skipped = sum(f.status == "skip" for f in findings)
    if issues:
        parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        footer = f"{issues} issue{'s' if issues != 1 else ''} found ({parts})"
    else:
        footer = "No issues found"
    if skipped:
        footer += f"; {skipped} skipped"
    lines += ["", footer]
    return "\n".join(lines)


def to_json(findings: Sequence[Finding]) -> str:
    return json.dumps({"schema_version": SCHEMA_VERSION, "findings": [f.to_dict() for f in findings],
                       "exit_code": exit_code(findings)}, indent=2, default=str)


def _can_print_unicode() -> bool:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "✓✗☠•".encode(encoding)
        return True
    except (UnicodeEncodeError, LookupError):
        return False


@contextlib.contextmanager
def _arrivals(total: int, quiet: bool):
    """On a terminal, each finding on stderr as it arrives (a transient bar that gives way to the report in its
    fixed order); nothing under --json or when stderr is not a terminal."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield None
        return
    with Progress(TextColumn("[bold]check"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=True) as progress:
        task = progress.add_task("probing", total=total)

        marks = MARKS if _can_print_unicode() else ASCII_MARKS

        def on_finding(finding: Finding) -> None:
            # The bar's line, not a printed one: the report below lists every finding once, in its fixed order.
            line = f"{marks[finding.status]} {finding.id}: {finding.summary}"
            progress.update(task, advance=1, description=escape(line if len(line) <= 90 else line[:87] + "..."))

        yield on_finding
