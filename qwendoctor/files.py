"""Files qwendoctor writes: atomically, so a crash, a full disk or Ctrl-C leaves the old file or the new one,
never half of one and never a temporary file behind; and the cache directory where reference renders live.

Also what qwendoctor may touch at all. A rename replaces whatever the name points at: named a device node it would
replace the node with a regular file (as root, against /dev/sda, a broken machine), named a symlink it would cut
the link and leave the target stale. So writes replace only regular files or create new ones. And every file a
user names is read with a bound: /dev/zero as a prompts file would otherwise fill the memory, a FIFO would block.
"""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import stat
import tempfile
from typing import IO, Iterator

from qwendoctor.errors import UsageError

CACHE_ENV = "QWENDOCTOR_CACHE"
# Prompts files, locks, bench documents: text a person writes or a run leaves, kilobytes. 1 MiB is far above any.
MAX_READ_BYTES = 1 << 20


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_replaceable(path: str | os.PathLike, option: str | None = None) -> None:
    """Refuse, in one line, to replace anything but a regular file: a device, FIFO, socket or directory, and a
    symbolic link (replacing it would cut the link and leave its target stale; writing through it would write
    wherever it points). A path that does not exist yet is fine."""
    path = os.fspath(path)
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there to replace; the folder is checked elsewhere
        return
    except OSError as error:
        raise UsageError(f"{option + ' ' if option else ''}{path}: {error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        raise UsageError(f"{option + ' ' if option else ''}{path}: is {_kind(mode)}; qwendoctor only replaces "
                         "regular files (name a regular file or a new one)")


def read_bounded(path: str | os.PathLike, option: str, limit: int = MAX_READ_BYTES, binary: bool = False):
    """The contents of a user-named file, refused in one line if it is not a regular file (a device or FIFO never
    ends, or blocks) or is over `limit` bytes. Errors name `option`; OSError and UnicodeDecodeError are the
    caller's to word (a missing file is worded differently by each)."""
    path = os.fspath(path)
    # O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever before fstat could refuse it.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with open(descriptor, "rb", closefd=True) as handle:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise UsageError(f"{option} {path}: is {_kind(mode)}, not a regular file")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise UsageError(f"{option} {path}: larger than {limit // (1 << 20)} MiB; not a file qwendoctor reads")
    return data if binary else data.decode("utf-8")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", durable: bool = False,
                 publish: bool = True) -> Iterator[IO]:
    """Open a temporary file beside `path` and, if the block ends without an error, rename it over `path`.

    The temporary name is unique (another process, or another host over NFS, may be writing the same path), and
    hidden. `durable`: fsync before the rename, for files that must survive a power cut (the lock). `publish`
    False: leave the finished temporary file for the caller to link and remove (a name that must not replace an
    existing file); on an error it is removed all the same."""
    path = os.fspath(path)
    check_replaceable(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    stem, suffix = os.path.splitext(os.path.basename(path))
    remove_orphaned_temporaries(directory, stem, suffix)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{stem}~{os.getpid()}~{socket.gethostname()}~",
                                             suffix=f"{suffix}.tmp", dir=directory)
    try:
        os.close(descriptor)  # reopened by name, so that `handle.name` is the temporary file's path
        # mkstemp makes it private (0600); the file it becomes gets what open() would give it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        with open(temporary, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        if publish:
            os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def remove_orphaned_temporaries(directory: str, stem: str, suffix: str) -> list[str]:
    """Remove the temporary files that writers of this path on this host left when killed outright (SIGKILL, the
    OOM killer, a power cut), where no cleanup could run: those whose process is gone. Returns their paths."""
    import psutil

    pattern = os.path.join(glob.escape(directory), f".{glob.escape(stem)}~*~{glob.escape(socket.gethostname())}~*"
                                                   f"{glob.escape(suffix)}.tmp")
    removed = []
    for temporary in glob.glob(pattern):
        pid = os.path.basename(temporary)[len(stem) + 2:].split("~", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
                removed.append(temporary)
    return removed


def write_text_atomic(path: str | os.PathLike, text: str, durable: bool = False) -> None:
    with atomic_write(path, "w", durable=durable) as handle:
        handle.write(text)


def cache_dir(override: str | None = None) -> str:
    """Where reference renders are kept between runs: `override`, else $QWENDOCTOR_CACHE, else
    ~/.cache/qwendoctor."""
    return override or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "qwendoctor")


def writable_directory(path: str, option: str) -> None:
    """Make sure `path` is, or can be made, a directory this process can write into, before any work that would
    end in writing there; a one-line usage error naming `option` otherwise. Nothing is created here: bad input
    leaves no trace."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a file, not a directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{option} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: {existing} is not writable")
