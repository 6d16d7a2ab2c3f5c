"""Import packages in this fresh interpreter and print one JSON line per package (the imports probe's child).

    python -P probes/_import_child.py <seconds per package> key=module[:attr,attr][;module...] ...

Run by path with -P and written against the standard library only, so nothing of this checkout (probes/ holds a
`diffusers.py`) can shadow what it imports. Before each package it prints {"start": key}; after it, the result.
A package whose import takes longer than <seconds> makes faulthandler print every thread's stack to stderr and
end the process (exit code 1), so the parent learns which package hangs and where, and runs the rest anew.
`describe` is also what probes.imports uses on an import error caught in a probe's own process.
"""

from __future__ import annotations

import importlib
import json
import linecache
import os
import re
import sys
import time
import traceback

_CANNOT_IMPORT = re.compile(r"cannot import name '([^']+)' from '([^']+)'")


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and what caused it, outermost first (diffusers' and transformers' lazy modules wrap the
    ModuleNotFoundError in a RuntimeError)."""
    chain: list[BaseException] = []
    while exc is not None and len(chain) < 8 and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return chain


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0].strip() if lines else ""
    return first if len(first) <= 300 else first[:297] + "..."


def describe(exc: BaseException) -> dict:
    """What an import failure says, as plain data: the error (`Type: first line`), the innermost ImportError's
    missing module (ModuleNotFoundError.name) or the name it could not import, and the module whose code ran
    the failed import statement, with the line."""
    chain = _chain(exc)
    first = _first_line(exc)
    info = {"error": f"{type(exc).__name__}: {first}" if first else type(exc).__name__,
            "chain": [f"{type(e).__name__}: {_first_line(e)}" for e in chain[1:]],
            "missing": None, "cannot_import": None, "from_module": None, "importer": None, "at": None}
    import_errors = [e for e in chain if isinstance(e, ImportError)]
    if not import_errors:
        return info
    root = import_errors[-1]
    if isinstance(root, ModuleNotFoundError) and root.name:
        info["missing"] = root.name
    else:
        match = _CANNOT_IMPORT.search(str(root))
        if match:
            info["cannot_import"], info["from_module"] = match.group(1), match.group(2)
        elif root.name:
            info["from_module"] = root.name
    # The last frame outside importlib's machinery is the import statement that failed.
    frames = [(frame, line) for frame, line in traceback.walk_tb(root.__traceback__)
              if not frame.f_code.co_filename.startswith("<frozen ")]
    if frames:
        frame, line = frames[-1]
        module = frame.f_globals.get("__name__")
        if module and module != "__main__":
            info["importer"] = module
        path = frame.f_code.co_filename
        source = linecache.getline(path, line).strip()
        info["at"] = f"{path}:{line}" + (f": {source}" if source else "")
    return info


def _import(target: str) -> None:
    for item in filter(None, target.split(";")):
        module, _, names = item.partition(":")
        imported = importlib.import_module(module)
        for name in filter(None, names.split(",")):
            getattr(imported, name)  # lazy modules (diffusers, transformers) import on attribute access


def main(argv: list[str]) -> None:
    import faulthandler

    out = os.dup(1)
    os.dup2(2, 1)  # what the imports print goes to stderr: stdout carries only the JSON lines

    def emit(data: dict) -> None:
        os.write(out, (json.dumps(data, default=str) + "\n").encode())

    seconds = float(argv[0])
    for spec in argv[1:]:
        key, _, target = spec.partition("=")
        emit({"start": key})
        faulthandler.dump_traceback_later(seconds, exit=True)
        started = time.perf_counter()
        try:
            _import(target)
            result = {"ok": True}
        except BaseException as exc:  # SystemExit and KeyboardInterrupt from a package's import are failures too
            result = {"ok": False, **describe(exc)}
        faulthandler.cancel_dump_traceback_later()
        emit({"key": key, "seconds": round(time.perf_counter() - started, 3), **result})
    sys.stderr.flush()
    # Everything is reported: skip the interpreter's teardown (torch's takes seconds).
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
