"""One small hierarchy of errors, and one exit-code convention for every command of the project.

* `BadInput`: something the user gave (a file, a setting, an id) cannot be used. Exit code 2.
* `Failure`: the input was fine but the work failed (a network error, a verification that did not pass,
  the GPU ran out of memory). Exit code 1.

Each message is one line that names the file or setting and says what to do. `run_command` prints it on
stderr as `error: ...` (never a traceback) and returns the exit code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

BAD_INPUT_EXIT = 2
FAILURE_EXIT = 1
INTERRUPTED_EXIT = 130


class ProjectError(Exception):
    """Base of the project's errors; `exit_code` is what a command returns for it."""

    exit_code = FAILURE_EXIT


class BadInput(ProjectError, ValueError):
    """The user's input cannot be used; the message names it and says what to do."""

    exit_code = BAD_INPUT_EXIT


class Failure(ProjectError, RuntimeError):
    """The work failed although the input was valid; the message says what happened and what to try."""

    exit_code = FAILURE_EXIT


def one_line(text: str) -> str:
    """`text` folded onto one line (messages from libraries sometimes span several)."""
    return " ".join(str(text).split())


def error_summary(error: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` (at most `limit` characters of it): why a fallback was taken."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:limit]}"


def run_command(main: Callable[[], int], redact: Callable[[str], str] = lambda text: text,
                on_interrupt: str = "interrupted") -> int:
    """Run a command's `main()`: project errors become `error: <message>` on stderr and their exit code."""
    try:
        return main()
    except ProjectError as error:
        print(f"error: {redact(one_line(error))}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(on_interrupt, file=sys.stderr)
        return INTERRUPTED_EXIT
    except BrokenPipeError:  # output piped into e.g. `head`
        return FAILURE_EXIT
