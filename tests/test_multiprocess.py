"""`qlora-jax train` as two real processes on localhost (CPU, `jax.distributed`, Gloo collectives), against one
process: the same losses, a SIGTERM to one process stopping both at the same step with one checkpoint (JAX's
preemption sync point), that checkpoint resumed by one process; and the start failures of a job, each one line
on every process: a directory the processes do not share, process 0's refusal, a process that never comes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _config(tmp_path: Path, model: Path, **train) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "train.jsonl"
    lines = (ROOT / "examples" / "data" / "dates_train.jsonl").read_text().splitlines(True)[:64]
    data.write_text("".join(lines))
    raw = {
        "model": {"path": str(model), "quant": "nf4", "dtype": "float32"},
        "data": {"train": str(data), "max_length": 64},
        "lora": {"r": 4, "lora_alpha": 8},
        # constant: the learning rate of a step does not depend on train.steps, so runs of other lengths compare
        "optim": {"learning_rate": 3e-3, "schedule": "constant"},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "steps": 40,
            "batch_size": 4,
            "remat": "none",
            "export_peft": False,
            "divergence_factor": 0,
        }
        | train,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    config: Path, processes: int, *extra: list[str], count: int = 2, port: int | None = None
) -> list[subprocess.Popen]:
    """`count`-process job on localhost, of which processes `processes` (ids) are started; `extra[i]`: process
    i's own extra arguments."""
    port = port or _free_port()
    started = []
    for i in processes:
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            PYTHONUNBUFFERED="1",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(count),
            JAX_PROCESS_ID=str(i),
        )
        command = [
            sys.executable,
            "-m",
            "qlora_jax.cli",
            "train",
            "--no-progress",
            str(config),
            "--mesh.data",
            str(count),
            *(extra[i] if i < len(extra) else []),
        ]
        started.append(
            subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return started


def _finish(processes: list[subprocess.Popen], timeout: float = 900) -> list[tuple[int, str]]:
    out = []
    for process in processes:
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        out.append((process.returncode, stderr))
    return out


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_two_processes_train_as_one_stop_together_on_sigterm_and_resume_on_one(tmp_path, tiny_model_dir):
    """Two processes (data=2, one CPU device each): SIGTERM to process 1 after step 2 stops both at the same step
    (JAX's preemption sync point), each with exit status 143 and one line naming the step; the checkpoint they
    wrote together resumes in one process, and every step's loss equals one process's uninterrupted run."""
    config = _config(tmp_path / "two", tiny_model_dir)
    run = tmp_path / "two" / "run"
    processes = _launch(config, [0, 1])
    try:
        deadline = time.time() + 900
        while time.time() < deadline and len(_losses(run) if (run / "metrics.jsonl").exists() else {}) < 2:
            assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGTERM)
        results = _finish(processes)
    finally:
        for p in processes:
            p.kill()
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1, steps
    stopped = steps[0]
    assert 2 <= stopped < 40
    for code, stderr in results:
        assert code == 143, stderr[-3000:]
        assert _last_line(stderr) == (
            f"qlora-jax train: stopped by SIGTERM (a preemption notice to the job) after "
            f"step {stopped}; checkpoint saved at {run / 'checkpoints' / str(stopped)}: "
            f"run the same command again to resume from step {stopped}"
        )
        assert "Traceback" not in stderr and "Reached preemption sync point" not in stderr
    assert not (run / ".lock").exists()
    assert max(_losses(run)) == stopped

    # one process resumes the two processes' checkpoint (another mesh), and a one-process run goes the same way
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    both = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qlora_jax.cli",
                "train",
                "--no-progress",
                str(config),
                "--train.steps",
                str(stopped + 2),
                *overrides,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for overrides in ([], ["--train.output_dir", str(tmp_path / "one")])
    ]
    for code, stderr in _finish(both):  # side by side: one resumes the two processes' run, one starts afresh
        assert code == 0, stderr[-3000:]
    two, one = _losses(run), _losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == list(range(1, stopped + 3))
    for step in one:  # float32 on both sides: the two devices' partial sums are added in another order
        assert two[step] == pytest.approx(one[step], rel=1e-5), (step, two[step], one[step])


def test_multi_process_start_failures_are_one_line_on_every_process(tmp_path, tiny_model_dir):
    """Before anything is loaded: a train.output_dir that is not one directory for both processes (here: each
    process is given its own, as on hosts without a shared file system), a refusal of process 0 (a directory that is
    not a run), and a process that never comes (mesh.initialization_timeout): one line each, no traceback."""
    config = _config(tmp_path, tiny_model_dir)
    a, b = tmp_path / "host-a", tmp_path / "host-b"
    results = _finish(_launch(config, [0, 1], ["--train.output_dir", str(a)], ["--train.output_dir", str(b)]))
    for code, stderr in results:
        assert code == 1, stderr[-3000:]
        assert f"train.output_dir {a if stderr is results[0][1] else b} is not one directory shared by all 2 " in stderr
        assert "process(es) 1 (host " in _last_line(stderr) and "Traceback" not in stderr
    assert not a.exists() and not b.exists()  # nothing left behind

    (a).mkdir()
    (a / "notes.txt").write_text("mine")
    results = _finish(_launch(config, [0, 1], ["--train.output_dir", str(a)], ["--train.output_dir", str(a)]))
    assert [code for code, _ in results] == [1, 1]
    assert _last_line(results[0][1]).startswith(f"qlora-jax train: train.output_dir {a} is not a run directory")
    assert _last_line(results[1][1]).startswith(f"qlora-jax train: process 0: train.output_dir {a} is not a run")
    assert (a / "notes.txt").read_text() == "mine" and sorted(os.listdir(a)) == ["notes.txt"]

    # A process that never comes: JAX's coordination service ends the waiting one itself (its own fatal log, an
    # abort: jax 0.10 offers no hook from Python), after mesh.initialization_timeout rather than 300 s; the line
    # before it says what it waited for.
    started = time.time()
    ((code, stderr),) = _finish(_launch(config, [1], [], ["--mesh.initialization_timeout", "5"]))
    assert code != 0 and time.time() - started < 90
    assert "process 1 of 2: waiting up to 5 s for all 2 processes at the coordinator 127.0.0.1:" in stderr
