"""Pre-emption: SIGTERM or SIGUSR1 (a cluster's notice) lets the current step finish, saves a checkpoint and exits
with :data:`PREEMPT_EXIT_CODE`, so that a requeued job resumes from that checkpoint."""

from __future__ import annotations

import contextlib
import signal

PREEMPT_EXIT_CODE = 75  # SIGTERM / SIGUSR1: the step finished, a checkpoint was saved, requeue and resume


class Preempted(Exception):
    """Raised after a SIGTERM/SIGUSR1 was honoured; ``summary`` is the interrupted run's summary."""

    def __init__(self, summary: dict, signum: int):
        super().__init__(f"stopped by signal {signum} at step {summary['steps']}; checkpoint saved")
        self.summary, self.signum = summary, signum


@contextlib.contextmanager
def preemption_signals():
    """While training, SIGTERM and SIGUSR1 only append their number to the yielded list; the loop stops after the
    step."""
    received: list[int] = []
    handled = [signal.SIGTERM, signal.SIGUSR1]
    try:
        previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in handled}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
