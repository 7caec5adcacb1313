"""The exception types the CLI turns into a one-line message and a non-zero exit."""


class DllmError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do next. Exit code 2."""

    exit_code = 2


class CheckFailed(DllmError):
    """An artifact failed a check (parity beyond its bound, a layer left unfused): exit code 1, nothing written."""

    exit_code = 1
