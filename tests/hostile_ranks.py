"""Ranks for tests/test_faults.py's launcher faults: `python -m tests.hostile_ranks sleep DIR` writes DIR/<rank>.pid
and waits, as a rank stuck in a long collective would; only its launcher going away can end it."""

import os
import sys
import time

from qwendoctor import parallel  # noqa: F401 (importing it is what ties a rank's life to torchrun's)


def main() -> None:
    mode, directory = sys.argv[1:3]
    assert mode == "sleep", mode
    path = os.path.join(directory, f"{os.environ['RANK']}.pid")
    with open(path + ".tmp", "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(600)


if __name__ == "__main__":
    main()
