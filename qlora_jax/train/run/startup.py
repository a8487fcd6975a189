"""How the processes of a run agree to start: one decision, one directory, or one message why not.

With one process, `started` holds the run directory's lock and yields its decision (`RunDirectory.decide`).

With several, process 0 alone checks and locks the directory and decides (resume, start, replace), then writes a
probe file into it; it publishes the decision (or its error) in the job's key-value store
(`qlora_jax.parallel.distributed.publish`). Every other process waits for that word, raises process 0's error if
there is one, and otherwise reports whether it sees the probe with the right content in its own
`train.output_dir`. Every process then reads every report: if any process does not see the probe, the directory is
not shared (each host has its own, or a path names another directory), and every process stops with the same
message naming the processes and hosts that do not see it, before anything is loaded: such a run would otherwise
hang at its first checkpoint, whose shards every process writes into the one directory.
"""

from __future__ import annotations

import contextlib
import json
import socket
import uuid
from collections.abc import Callable, Iterator

import jax

from qlora_jax import files
from qlora_jax.errors import QloraJaxError
from qlora_jax.parallel import distributed
from qlora_jax.train.run.run_dir import RunDirectory, RunStart

__all__ = ["started", "UnsharedRunDirectory"]

_PROBE = ".qlora_jax-shared-"


class UnsharedRunDirectory(QloraJaxError):
    """The processes of a multi-process run do not see the same train.output_dir."""


@contextlib.contextmanager
def started(run_dir: RunDirectory, decide: Callable[[], RunStart], *, timeout_s: float) -> Iterator[RunStart]:
    """The run's start, agreed by every process (module docstring); the lock is held for the block.
    `timeout_s`: how long the processes wait for process 0's word and for each other's reports."""
    if jax.process_count() == 1:
        with run_dir.locked():
            yield decide()
        return
    me, count = jax.process_index(), jax.process_count()
    with contextlib.ExitStack() as stack:
        if run_dir.primary:
            token = uuid.uuid4().hex
            try:
                stack.enter_context(run_dir.locked())
                start = decide()
                probe = run_dir.path / f"{_PROBE}{token}"
                files.write_text(probe, token)
                stack.callback(probe.unlink, missing_ok=True)
            except QloraJaxError as e:
                distributed.publish("qlora_jax/start", json.dumps({"error": str(e)}))
                raise
            distributed.publish("qlora_jax/start", json.dumps({"token": token, "start": start.to_json()}))
        else:
            word = json.loads(distributed.wait_for("qlora_jax/start", timeout_s, what="process 0's start"))
            if "error" in word:
                raise QloraJaxError(f"process 0: {word['error']}")
            token, start = word["token"], RunStart.from_json(word["start"])
        probe = run_dir.path / f"{_PROBE}{token}"
        try:
            seen = probe.read_text() == token
        except OSError:
            seen = False
        distributed.publish(f"qlora_jax/sees/{me}", json.dumps({"seen": seen, "host": socket.gethostname()}))
        reports = {
            i: json.loads(distributed.wait_for(f"qlora_jax/sees/{i}", timeout_s, what=f"process {i}"))
            for i in range(count)
        }
        if run_dir.primary:
            probe.unlink(missing_ok=True)  # every process has looked
        blind = [f"{i} (host {r['host']})" for i, r in reports.items() if not r["seen"]]
        if blind:
            raise UnsharedRunDirectory(
                f"train.output_dir {run_dir.path} is not one directory shared by all {count} processes: process(es) "
                f"{', '.join(blind)} do not see the file process 0 wrote there; every process writes its shards of "
                "each checkpoint into it, so it must be the same directory on every host (a shared file system): "
                "nothing was trained"
            )
        yield start
