"""Signals of the console programs (nbtorch.interrupt): after a program's main block only its start-up handlers
would be left, and those must not turn a finished run (an error already printed) into 'interrupted'."""
from __future__ import annotations

import signal

import pytest

from nbtorch import interrupt


@pytest.fixture
def saved_handlers():
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in old.items():
        signal.signal(s, h)


def test_after_the_main_block_a_console_program_ignores_signals(monkeypatch, saved_handlers):
    monkeypatch.setattr(interrupt.sys, "argv", ["/usr/bin/nbtorch-refine"])
    interrupt.quiet_startup()
    assert getattr(signal.getsignal(signal.SIGINT), "startup", False)
    with interrupt.interrupts():
        with pytest.raises(interrupt.Interrupted) as caught:
            signal.raise_signal(signal.SIGTERM)
        assert interrupt.exit_status(caught.value) == 143
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN == signal.getsignal(signal.SIGTERM)
    signal.raise_signal(signal.SIGINT)  # ignored: the run's status stands


def test_other_handlers_are_restored(saved_handlers):
    def mine(signum, frame):
        pass

    signal.signal(signal.SIGINT, mine)
    with interrupt.interrupts():
        pass
    assert signal.getsignal(signal.SIGINT) is mine
