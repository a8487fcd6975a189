"""Stopping a run on SIGTERM or SIGINT: finish the step, save a checkpoint, release the lock, exit with one line.

Schedulers (SLURM's `scancel`, Kubernetes, spot instances) send SIGTERM and wait a grace period before SIGKILL;
Ctrl-C sends SIGINT. While the step loop runs, either asks the run to stop after the current step: the loop saves
a checkpoint (checked like every one) and raises `TrainingStopped`, whose message names the step to resume from;
the CLI exits with status 128 + the signal's number (143 for SIGTERM, 130 for SIGINT). A second Ctrl-C stops at
once (KeyboardInterrupt: no checkpoint). Before the loop (loading, compiling) nothing has been trained: the
signal stops the run at once, with the same kind of message.

Several processes must stop at the same step, or the checkpoint (a collective write) never completes. JAX's
preemption service does that: `jax.distributed.initialize` installs a SIGTERM notifier in every process (which is
why a plain SIGTERM no longer ends a multi-process run), and `multihost_utils.reached_preemption_sync_point(step)`,
called after every step by every process, turns True at the same step everywhere once any process got SIGTERM.
SIGINT is passed on to it as a SIGTERM to the process itself. If the preemption service is off
(`jax_enable_preemption_service`), the processes agree on a flag by an all-gather after every step instead.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

import jax

from qlora_jax.errors import QloraJaxError

__all__ = ["StopSignals", "TrainingStopped"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(QloraJaxError):
    """The run stopped on a signal; `exit_code` is 128 + the signal's number (what a shell reports for it)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class _QuietSyncPoint(logging.Filter):
    """Drops orbax's warning at every save after a preemption notice ("Reached preemption sync point"): the run
    says what happens in its own line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Reached preemption sync point" not in str(record.msg)


def _preemption_service() -> Any:
    """JAX's preemption sync manager of a multi-process run, or None."""
    from jax._src import distributed

    return distributed.global_state.preemption_sync_manager


class StopSignals:
    """While entered (in the main thread), SIGTERM and SIGINT ask the run to stop; `steps()` marks the step loop.

    `requested(step)`: called after every step by every process; True when the run should save and stop there.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._in_steps = False
        self._previous: dict[int, Any] = {}
        self._processes = jax.process_count()
        self._service = _preemption_service() if self._processes > 1 else None
        self._quiet = _QuietSyncPoint()

    def __enter__(self) -> StopSignals:
        logging.getLogger("absl").addFilter(self._quiet)  # orbax logs through absl
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only: a run in another thread keeps their defaults
        for signum in _SIGNALS:
            if signum == signal.SIGTERM and self._service is not None:
                continue  # JAX's preemption notifier owns SIGTERM (and tells every process)
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("absl").removeFilter(self._quiet)
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def start_steps(self) -> None:
        """From now on a signal stops the run after the current step (before: at once)."""
        self._in_steps = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self._in_steps:
            raise TrainingStopped(
                f"stopped by {name} before training started; nothing was trained or changed "
                "since the last checkpoint: run the same command again to resume",
                signum,
            )
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        self.signum = signum
        print(
            f"\n{name}: stopping after this step (a checkpoint is saved; Ctrl-C again stops at once, without one)",
            file=sys.stderr,
            flush=True,
        )
        if self._service is not None and signum != signal.SIGTERM:
            signal.raise_signal(signal.SIGTERM)  # to JAX's preemption notifier, which tells every process

    def requested(self, step: int) -> bool:
        """Whether to save and stop after `step` (every process must call it after every step: in a multi-process
        run it is a point where all of them agree)."""
        if self._processes == 1:
            return self.signum is not None
        if self._service is not None:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        import numpy as np
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
        agreed = int(np.max(flags))
        if agreed and self.signum is None:
            self.signum = agreed
        return bool(agreed)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "SIGTERM (a preemption notice to the job)"

    def stopped(self, step: int, checkpoint: Any) -> TrainingStopped:
        """The error that ends a run stopped after `step`, its checkpoint saved at `checkpoint`."""
        return TrainingStopped(
            f"stopped by {self.signal_name} after step {step}; checkpoint saved at {checkpoint}: "
            f"run the same command again to resume from step {step}",
            self.signum or signal.SIGTERM,
        )
