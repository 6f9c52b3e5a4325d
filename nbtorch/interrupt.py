"""Interrupts of the command-line programs: SIGINT (Ctrl-C) and SIGTERM end a run with one line on stderr and exit
status 128 + signal number (130, 143), never a traceback, and leave no temporary file behind
(:func:`nbtorch.io._atomic.atomic_write` removes its temporary file on any exception).

    with interrupts():          # in a program's main(): both signals raise Interrupted
        ...
    except KeyboardInterrupt as exc: status = exit_status(exc)

:func:`quiet_startup` covers the seconds before ``main`` runs (importing torch): it is called first thing when the
``nbtorch`` package is imported and acts only inside the console scripts named in :data:`PROGRAMS`; warnings of a
program are one line too (:func:`one_line_warnings`).  This module imports only the standard library.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from typing import Iterator

__all__ = ["Interrupted", "interrupts", "exit_status", "quiet_startup", "one_line_warnings", "PROGRAMS"]

#: Console scripts whose start-up is made quiet (names as installed by pyproject.toml).
PROGRAMS = ("nbtorch", "nbtorch-refine", "nbtorch-sweep", "nbtorch-demo")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised by a SIGINT or SIGTERM inside :func:`interrupts`; ``signum`` is the signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)


def _raise(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupts() -> Iterator[None]:
    """Inside the block SIGINT and SIGTERM raise :class:`Interrupted` (a KeyboardInterrupt); the previous handlers
    are restored after it, except :func:`quiet_startup`'s: after a program's main block the program only reports
    and exits, so a signal then is ignored (its status stands, and a printed error is never followed by
    'interrupted').  A no-op outside the main thread (where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in _SIGNALS}
    for s in _SIGNALS:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, signal.SIG_IGN if getattr(h, "startup", False) else h)


def exit_status(exc: BaseException) -> int:
    """Exit status of an interrupted program: 128 + the signal number (130 for a plain KeyboardInterrupt)."""
    return 128 + getattr(exc, "signum", int(signal.SIGINT))


def quiet_startup() -> None:
    """Inside one of the :data:`PROGRAMS` (``sys.argv[0]``'s name), make SIGINT/SIGTERM during start-up end the
    process at once with one line and status 128 + signal (nothing has been written yet).  ``main`` replaces these
    handlers with :func:`interrupts`."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if prog not in PROGRAMS or threading.current_thread() is not threading.main_thread():
        return

    def _exit(signum, frame):
        os.write(2, f"\n{prog}: interrupted\n".encode())
        os._exit(128 + signum)

    _exit.startup = True  # what interrupts() does not restore
    for s in _SIGNALS:
        signal.signal(s, _exit)


def one_line_warnings(prog: str) -> None:
    """Print warnings as one line ``prog: warning: message`` (no source line; a message that already starts with
    ``prog: `` is not prefixed twice)."""
    warnings.formatwarning = lambda message, *_, **__: f"{prog}: warning: {str(message).removeprefix(prog + ': ')}\n"
