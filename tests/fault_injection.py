"""Runs the qwendoctor CLI with one fault injected at a named phase: tests/test_faults.py starts it as a process.

    python tests/fault_injection.py MODULE:FUNCTION:SIGNAL[:NTH] [MODULE:NAME=NUMBER] -- qwendoctor arguments...

The NTH call (1 by default) of MODULE.FUNCTION sends SIGNAL (KILL, TERM, INT) to this very process before the
function runs: a kill at an exact phase of the run (probing, the reference render, a trial's timed steps, the
lock's rename), not at whatever point a timer happens to land. MODULE:NAME=NUMBER sets a module's constant (a
time limit a test cannot wait out at its real value). Test code only: nothing in qwendoctor knows of it.
"""

import importlib
import os
import signal
import sys


def inject(spec: str) -> None:
    if "=" in spec:
        target, value = spec.split("=", 1)
        module_name, name = target.split(":")
        setattr(importlib.import_module(module_name), name, float(value))
        return
    module_name, function_name, signal_name, *nth = spec.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, function_name)
    wanted = int(nth[0]) if nth else 1
    calls = [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] == wanted:
            os.kill(os.getpid(), getattr(signal, f"SIG{signal_name}"))
        return original(*args, **kwargs)

    setattr(module, function_name, faulty)


if __name__ == "__main__":
    separator = sys.argv.index("--")
    for spec in sys.argv[1:separator]:
        inject(spec)
    from qwendoctor.cli import main

    main(sys.argv[separator + 1:])
