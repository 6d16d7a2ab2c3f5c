"""User-facing errors: each carries a one-line message and the exit code the CLI returns for it."""

EXIT_OK = 0
EXIT_FAILURE = 1  # the job ran and failed: a check failed, no feasible profile, a lock that does not fit
EXIT_USAGE = 2  # bad input: unknown option, invalid value, unreadable or invalid lock


class QwendoctorError(Exception):
    """An error the user can act on. The CLI prints `qwendoctor: error: <message>` and exits."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(QwendoctorError):
    """Bad input from the user (a value out of range, a file that is not a lock)."""

    exit_code = EXIT_USAGE


class LockfileError(UsageError):
    """A lockfile that is missing, not TOML, or fails validation; the message names the field."""


class UnavailableLever(QwendoctorError):
    """A lever this machine cannot run (FP8 on a CPU): raised before anything loads, never faked."""
