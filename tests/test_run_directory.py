"""A run directory holds only what `train` wrote, and loses nothing: a directory that is not a run is refused
naming what it holds, a run that trained is never replaced without --overwrite (and then only its own files), and
an output directory published over another (a killed publish at every point) leaves the old one or the new one
whole."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_jax import files
from qlora_jax.cli import main as cli_main
from qlora_jax.train.config import load_config
from tests.test_run_safety import ENV, ROOT, _state


def _train_config(tmp_path: Path, output_dir: Path) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(tmp_path / "no-model")},
                "data": {"train": str(data)},
                "train": {"output_dir": str(output_dir)},
            }
        )
    )
    return config


def _tree(directory: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes() for p in sorted(directory.rglob("*"))}


def test_train_refuses_a_directory_that_is_not_its_own_and_changes_nothing(tmp_path):
    """A model's folder, and a symlink to a folder with the user's files, as train.output_dir: refused before
    anything is loaded or written, naming what they hold (and where the link leads)."""
    model = tmp_path / "SmolLM2"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (model / name).write_text(name)
    (model / "adapter").mkdir()
    config = _train_config(tmp_path, model)
    before = _tree(model)
    with pytest.raises(
        SystemExit,
        match=rf"train.output_dir {model} is not a run directory of qlora-jax and is not "
        r"empty: it holds adapter/, config.json, model.safetensors, tokenizer.json;",
    ):
        cli_main(["train", str(config)])
    with pytest.raises(SystemExit, match="is not a run directory"):  # no flag makes it one
        cli_main(["train", str(config), "--overwrite"])
    assert _tree(model) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(
        SystemExit,
        match=rf"train.output_dir {link} \(a link to {mine}\) is not a run directory of "
        r"qlora-jax and is not empty: it holds notes.txt",
    ):
        cli_main(["train", str(config), "--train.output_dir", str(link)])
    assert _tree(mine) == {"notes.txt": b"precious"}
    (mine / "notes.txt").unlink()  # an empty directory is fine: train gets as far as the (missing) model
    with pytest.raises(SystemExit, match="no-model"):
        cli_main(["train", str(config), "--train.output_dir", str(link)])
    assert _tree(mine) == {}


def _finished_run(run: Path, *, checkpoints: bool) -> None:
    """What a finished run leaves (as far as deciding how to start is concerned)."""
    from qlora_jax.train.run.run_dir import RUN_FORMAT

    run.mkdir()
    (run / "run.json").write_text(json.dumps({"format": RUN_FORMAT, "data": None}))
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    if checkpoints:
        from qlora_jax.train.run.checkpoint import RunCheckpoints

        saver = RunCheckpoints(run / "checkpoints")
        saver.save(_state(1), {})
        saver.close()


def test_a_finished_run_without_checkpoints_is_never_replaced_unasked(tmp_path):
    """Its checkpoints deleted to save space, a finished run trained again is refused (not restarted at step 0);
    with --overwrite it is replaced, but only once the inputs have been read (a missing model: still as it was);
    `train.resume: false` on a run with checkpoints says so too."""
    from qlora_jax.train.run.run_dir import RunDirectory

    run = tmp_path / "run"
    _finished_run(run, checkpoints=False)
    (run / "notes.txt").write_text("the user's")
    config = _train_config(tmp_path, run)
    before = _tree(run)
    with pytest.raises(
        SystemExit,
        match=rf"train.output_dir {run} holds a run that trained \(adapter/, metrics.jsonl\)"
        r" and has no checkpoint to resume from \(checkpoints/ deleted\?\): a run is "
        r"never replaced without --overwrite",
    ):
        cli_main(["train", str(config), "--lora.r", "64"])
    with pytest.raises(SystemExit, match="no-model"):  # replacing waits until the inputs are checked
        cli_main(["train", str(config), "--overwrite"])
    assert _tree(run) == before
    run_dir = RunDirectory(run)
    assert run_dir.decide(load_config(config), {}, overwrite=True).replacing
    run_dir.write_start(load_config(config), {}, run_dir.decide(load_config(config), {}, overwrite=True))
    assert sorted(_tree(run)) == ["config.json", "notes.txt", "run.json"]  # the run's own outputs only

    other = tmp_path / "other"
    _finished_run(other, checkpoints=True)
    with pytest.raises(
        SystemExit,
        match=r"holds checkpoints of a run \(steps 1\) and train.resume is false: .*"
        r"replace it with --overwrite",
    ):
        cli_main(["train", str(config), "--train.output_dir", str(other), "--train.resume", "false"])
    start = RunDirectory(other).decide(load_config(config), {}, overwrite=True)
    assert start.replacing and not start.resuming
    (other / "checkpoints" / "2024").mkdir()
    RunDirectory(other).write_start(load_config(config), {}, start)
    assert sorted(_tree(other)) == ["checkpoints", "checkpoints/2024", "config.json", "run.json"]


_PUBLISHER = """
import os, signal, sys
from pathlib import Path
from qlora_jax import files
out, version, kill_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if sys.argv[4] == "no-exchange":
    files._exchange = lambda a, b: False  # a kernel or file system without renameat2's exchange
EVENTS = {"os.rename", "os.link", "os.remove", "os.rmdir", "os.unlink", "shutil.rmtree", "os.mkdir", "os.chmod",
          "os.symlink", "open", "ctypes.call_function"}
count = 0

def hook(event, args):  # SIGKILL at the kill_at-th file-system change (or exchange) under out's parent
    global count
    if event not in EVENTS:
        return
    if event == "open" and not (len(args) > 1 and isinstance(args[1], str) and set(args[1]) & set("wax+")):
        return
    if event != "ctypes.call_function" and str(out.parent) not in str(args[0]) and os.path.isabs(str(args[0])):
        return
    count += 1
    if count == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
with files.staged_directory(out, replaces=["model*.bin"]) as staging:
    (staging / "adapter_config.json").write_text(f'{{"lora_alpha": {version}}}')
    (staging / "weights.bin").write_text(version * 1000)
    (staging / "sub").mkdir()
    (staging / "sub" / "more.bin").write_text(version)
print(count)
"""


def _published(out: Path, version: str, kill_at: int, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _PUBLISHER, str(out), version, str(kill_at), mode],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _version(out: Path) -> str:
    """The version of the output directory a reader sees; fails on a mix of two."""
    alpha = json.loads((out / "adapter_config.json").read_text())["lora_alpha"]
    weights, more = (out / "weights.bin").read_text(), (out / "sub" / "more.bin").read_text()
    assert weights == str(alpha) * 1000 and more == str(alpha), (alpha, weights[:3], more)
    return str(alpha)


@pytest.mark.parametrize("mode", ["exchange", "no-exchange"])
def test_a_publish_killed_at_any_point_leaves_the_old_or_the_new_directory_whole(tmp_path, mode):
    """Version 2 of an output directory published over version 1 (which also holds a file of the user's and an
    old layout's file that the new one replaces), SIGKILLed at every file-system change of the publish: a reader
    sees version 1 whole or version 2 whole, the user's file stays, and the next publish removes the leftovers."""
    calibration = tmp_path / "calibration" / "adapter"
    assert _published(calibration, "1", -1, mode).returncode == 0
    done = _published(calibration, "2", -1, mode)
    assert done.returncode == 0, done.stderr
    changes = int(done.stdout)
    assert _version(calibration) == "2"
    seen = set()
    for kill_at in range(1, changes + 1):
        out = tmp_path / str(kill_at) / "adapter"
        assert _published(out, "1", -1, mode).returncode == 0
        (out / "README.md").write_text("the user's")
        (out / "model-old.bin").write_text("an old layout's")
        killed = _published(out, "2", kill_at, mode)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr[-2000:])
        if not out.exists():  # the fallback's one window: renamed aside, not yet replaced
            assert mode == "no-exchange"
            files.clean_partials(out)  # what the next write of this output does first: puts the old one back
        version = _version(out)
        seen.add(version)
        assert (out / "README.md").read_text() == "the user's"
        assert (out / "model-old.bin").exists() == (version == "1")
        assert _published(out, "3", -1, mode).returncode == 0  # the next publish cleans up after the crash
        assert _version(out) == "3" and (out / "README.md").read_text() == "the user's"
        assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"], (kill_at, list(out.parent.iterdir()))
    assert seen == {"1", "2"}  # the kills fell before and after the switch
