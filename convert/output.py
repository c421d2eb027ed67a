"""Where the converter writes, and how it never loses data: output checks, the hidden work folder, signals.

Everything is written into a hidden work folder next to `--out` (`.NAME.partial-PID`) and moved into place
only after verification. The work folder is removed on any failure, Ctrl-C, SIGTERM or SIGHUP; a folder left
by a process that was killed outright (SIGKILL, power loss) is removed by the next run on the same `--out`.
`--out` may never be, hold, or lie inside the source, and `--overwrite` replaces only an earlier output of
this tool (a folder holding its `fp8_conversion.json` report).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sd35fp8.errors import BadInput, Failure
from sd35fp8.loading import format_bytes

REPORT_NAME = "fp8_conversion.json"  # what the converter writes into a verified variant; marks its outputs
HANDLED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class OutputError(BadInput):
    """--out cannot be used as asked; the message says why and what to do."""


class Interrupted(Failure):
    """The run was stopped by a signal; its exit code is 128 + the signal number (130 for Ctrl-C)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + signum


def disk_error(error: OSError, doing: str) -> BadInput | Failure:
    """A one-line project error for an OSError met while `doing` something with files."""
    where = f" ({error.filename})" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return Failure(f"no space left on the device while {doing}{where}: free some space or choose another --out, "
                       "then run this again.")
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        reason = "the file system is read-only" if error.errno == errno.EROFS else "permission denied"
        return OutputError(f"{reason} while {doing}{where}: choose an --out you can write to (and a source you can read).")
    return Failure(f"{error.strerror or type(error).__name__} while {doing}{where}.")


def is_previous_output(folder: Path) -> bool:
    """True if `folder` was written and verified by this tool (its report says so)."""
    try:
        report = json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(report, dict) and report.get("verified") is True


@contextmanager
def step(text: str):
    """Name what the run is doing, so an unexpected error can say where it happened (`failed_step`)."""
    try:
        yield
    except BaseException as error:
        if not hasattr(error, "convert_step"):  # the innermost step names it
            error.convert_step = text
        raise


def failed_step(error: BaseException) -> str:
    """The step `error` escaped from (see `step`)."""
    return getattr(error, "convert_step", "starting")


def check_out(out: Path, overwrite: bool) -> Path:
    """The real path `--out` stands for, if it can be written (and, when it exists, replaced); else OutputError."""
    given = Path(out).expanduser().absolute()
    if given.is_symlink() and not given.exists():
        raise OutputError(f"--out {out} is a symbolic link pointing nowhere: remove it or give a folder.")
    for ancestor in given.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputError(f"--out {out}: {ancestor} is a file, not a folder. Choose an --out inside a folder.")
            break
    real = given.resolve()
    if real == real.parent:
        raise OutputError(f"--out {out} is the root of the file system: choose a folder for the variant.")
    if real.exists():
        if not real.is_dir():
            raise OutputError(f"--out {out} is a file. --overwrite only ever replaces a folder written by this tool: "
                              "choose another --out.")
        if any(real.iterdir()):
            if not overwrite:
                raise OutputError(f"{out} already exists and is not empty: choose another --out or pass --overwrite.")
            if not is_previous_output(real):
                raise OutputError(f"--overwrite only replaces a folder written by this tool (one holding its "
                                  f"{REPORT_NAME} report), and {out} is not one: choose another --out.")
    return real


def check_apart(out: Path, source_paths: Iterable[Path], source: str) -> None:
    """Refuse an `out` (a real path) that is, holds or lies inside any folder or file of the source."""
    for path in source_paths:
        if out == path or out.is_relative_to(path) or path.is_relative_to(out):
            relation = "is" if out == path else ("lies inside" if out.is_relative_to(path) else "holds")
            raise OutputError(f"--out {out} {relation} {path}, part of the source {source}: writing there could destroy "
                              "the source. Choose an --out outside the source.")


def check_free_space(out: Path, needed: int) -> None:
    """Refuse to start when the file system of `out` has clearly too little room for `needed` bytes."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise OutputError(f"--out {out}: the variant needs about {format_bytes(needed)} but only {format_bytes(free)} "
                          f"are free there{' (the old output is replaced only at the end)' if out.exists() else ''}: "
                          "free some space or choose another --out.")


_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own number, so whoever left this is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    try:  # a killed process its parent has not reaped yet is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_leftovers(out: Path) -> list[str]:
    """Remove the work folders that killed runs on `out` left next to it; returns what was done, one line each.

    A run killed while swapping an old output for a new one leaves the old one as `.NAME.old-PID`; if `out` is
    missing it is put back. A work folder of a process still running means another conversion is writing `out`.
    """
    done = []
    if not out.parent.is_dir():
        return done
    for path in sorted(out.parent.iterdir()):
        match = _LEFTOVER.fullmatch(path.name)
        if not match or match["name"] != out.name or not path.is_dir() or path.is_symlink():
            continue
        pid = int(match["pid"])
        if _process_alive(pid):
            raise OutputError(f"another conversion (process {pid}) is writing {out} (its work folder {path} exists): "
                              f"wait for it to finish, or stop it; if no conversion is running, delete {path}.")
        if match["kind"] == "old" and not out.exists():
            path.rename(out)
            done.append(f"put back {out}, the earlier output that process {pid} was replacing when it was killed")
        else:
            shutil.rmtree(path)
            done.append(f"removed {path}, left by process {pid} which was killed")
    return done


@dataclass
class _SignalState:
    received: int | None = None
    deferred: bool = False
    pending: bool = False


_signals = _SignalState()


def last_signal() -> int:
    """The signal that stopped the run (SIGINT when it was a plain KeyboardInterrupt)."""
    return _signals.received or signal.SIGINT


def _on_signal(signum, frame):
    _signals.received = signum
    if _signals.deferred:
        _signals.pending = True
        return
    raise KeyboardInterrupt


@contextmanager
def signals_as_interrupt():
    """Within this block SIGTERM and SIGHUP stop the run like Ctrl-C (KeyboardInterrupt), so the same cleanup runs.

    Yields the state; `.received` is the last signal. Only the main thread can install handlers; elsewhere this
    does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield _signals
        return
    previous = {signum: signal.signal(signum, _on_signal) for signum in HANDLED_SIGNALS}
    _signals.received, _signals.pending = None, False
    try:
        yield _signals
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def signals_deferred():
    """Within this block a signal is remembered rather than raised, so cleanup cannot be cut short; it is raised after."""
    outer = _signals.deferred
    _signals.deferred = True
    try:
        yield
    finally:
        _signals.deferred = outer
        if not outer and _signals.pending:
            _signals.pending = False
            raise KeyboardInterrupt


class WorkFolder:
    """The hidden folder a conversion writes into, moved to `out` by `commit()`; removed on any failure.

    Parent folders of `out` that did not exist are created, and removed again on failure.
    """

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}.partial-{os.getpid()}"
        self._created: list[Path] = []
        self.committed = False

    def __enter__(self) -> WorkFolder:
        missing = [p for p in (self.out.parent, *self.out.parent.parents) if not p.exists()]
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self._created.append(folder)
            self.path.mkdir()
        except OSError as error:
            self._remove()
            raise disk_error(error, f"creating the work folder {self.path}") from None
        return self

    def commit(self) -> None:
        """Move the work folder to `out`, replacing an earlier output there (only after the new one is in place)."""
        with signals_deferred():
            old = None
            if self.out.exists():
                old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
                self.out.rename(old)
            try:
                self.path.rename(self.out)
            except OSError:
                if old is not None:
                    old.rename(self.out)
                raise
            self.committed = True
            if old is not None:
                shutil.rmtree(old)

    def _remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break

    def __exit__(self, kind, error, traceback) -> None:
        if not self.committed:
            with signals_deferred():
                self._remove()
