"""No command damages a user's outputs: run-directory locks between real processes, checkpoints killed (-9) at
random points of saving and deletion, atomic writes, resume checks, divergence rules, non-finite weights refused
by every reader and writer, and errors instead of tracebacks. (End-to-end runs of `train` are in test_train.py.)"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from qlora_jax import files
from qlora_jax.cli import main as cli_main
from qlora_jax.errors import InputError, QloraJaxError
from qlora_jax.train.config import ConfigFieldError, config_from_dict, load_config
from qlora_jax.train.run.divergence import DivergenceGuard, TrainingDiverged
from qlora_jax.train.run.lock import LOCK_FILE, RunDirectoryLocked, RunLock
from qlora_jax.train.run.resume import RESUMABLE_FIELDS, ResumeError, check_resumable, check_same_data, data_fingerprint
from tests.families import write_one_block_gguf

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))


# ---- the run-directory lock, between real processes ------------------------------------------------------------

_HOLD = """
import sys, time
from qlora_jax.train.run.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(directory: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(directory)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_process_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    first = _holder(run)
    try:
        second = subprocess.run(
            [sys.executable, "-c", _HOLD, str(run)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
        )
        assert second.returncode != 0
        assert f"in use by another training (pid {first.pid} on host {socket.gethostname()}" in second.stderr
        with pytest.raises(RunDirectoryLocked, match=f"pid {first.pid}"):  # and in this process too
            RunLock(run).acquire()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run / LOCK_FILE).is_file()  # a killed process removes nothing
    with RunLock(run) as lock:
        assert lock.taken_over.startswith(f"pid {first.pid} on host {socket.gethostname()}")
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"taking over the lock left by pid {first.pid}" in out
    assert not (run / LOCK_FILE).exists()  # released: removed
    with RunLock(run) as lock:  # a clean release leaves nothing to take over
        assert lock.taken_over is None


def test_a_lock_of_another_host_is_taken_over_only_when_its_heartbeat_stopped_or_when_asked(tmp_path, capsys):
    """A lock from another host (whose process cannot be checked from here): refused while its heartbeat (the
    file's modification time) is recent, taken over once it is stale, or at once with break_lock (--break-lock);
    while held, the lock's heartbeat goes on."""
    lock_file = tmp_path / LOCK_FILE
    lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(
        RunDirectoryLocked,
        match=r"pid 1 on host elsewhere since then \(last heartbeat \d+ s ago\), "
        r"which cannot be checked from host .*run again with --break-lock",
    ):
        RunLock(tmp_path).acquire()
    assert json.loads(lock_file.read_text())["pid"] == 1  # left as it was
    with RunLock(tmp_path, break_lock=True) as lock:
        assert lock.taken_over.startswith("pid 1 on host elsewhere")
    assert "broken as asked (--break-lock" in capsys.readouterr().out
    lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    an_hour_ago = time.time() - 3600
    os.utime(lock_file, (an_hour_ago, an_hour_ago))
    with RunLock(tmp_path, heartbeat_s=0.05) as lock:
        assert "whose heartbeat stopped 60 minutes ago" in capsys.readouterr().out
        time.sleep(0.3)
        assert time.time() - lock_file.stat().st_mtime < 5  # its own heartbeat


# ---- checkpoints killed at random points of saving and deleting -----------------------------------------------

_SAVER = """
import os, signal, sys
directory, kill_at = sys.argv[1], int(sys.argv[2])
MUTATING = {"os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "open"}
count, kinds = 0, []

def hook(event, args):  # counts every file-system change in `directory`; SIGKILL at the kill_at-th
    global count
    if event not in MUTATING or not args:
        return
    path = str(args[0])
    if event == "open" and not (len(args) > 1 and isinstance(args[1], str) and set(args[1]) & set("wax+")):
        return
    if os.path.isabs(path) and not path.startswith(directory):
        return
    count += 1
    name = path[len(directory):].strip("/")
    if event == "os.rename" and str(args[1]).endswith("/qlora_jax.json"):
        kinds.append("commit" + name.split("/")[0])  # the step's manifest: what makes it complete, and ours
    elif "/trash" in path or not os.path.isabs(path) or (event == "os.rename" and name.isdigit()):
        kinds.append("delete")  # moving a step into the trash and removing it there (relative: in shutil.rmtree)
    else:
        kinds.append("save")
    if count == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

import jax.numpy as jnp, optax
from qlora_jax.train.run.checkpoint import RunCheckpoints
from qlora_jax.train.step import TrainState

sys.addaudithook(hook)
checkpoints = RunCheckpoints(directory, keep=2)
for step in range(1, 6):
    lora = {"a": jnp.full((4, 8), float(step))}
    checkpoints.save(TrainState(jnp.int32(step), lora, optax.adam(1e-3).init(lora)), {"step": step})
checkpoints.close()
print(" ".join(kinds))
"""


def _saver(directory: Path, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _SAVER, str(directory), str(kill_at)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _check_restorable(directory: Path, capsys) -> list[int]:
    """Opens the checkpoints as `train` does and restores every one: each must hold its own step's values."""
    import jax.numpy as jnp
    import optax

    from qlora_jax.train.run.checkpoint import RunCheckpoints, complete_steps
    from qlora_jax.train.step import TrainState

    trash = directory / ".qlora_jax" / "trash"
    leftovers = {p.name for p in directory.iterdir()} - {str(s) for s in complete_steps(directory)} - {".qlora_jax"}
    leftovers |= set(os.listdir(trash)) if trash.is_dir() else set()
    capsys.readouterr()
    checkpoints = RunCheckpoints(directory, keep=2)
    try:
        said = capsys.readouterr().out
        assert said.count("removed what an interrupted run left") == (1 if leftovers else 0), (leftovers, said)
        assert "did not write" not in said  # everything there was ours
        assert sorted(p.name for p in directory.iterdir()) == [".qlora_jax", *map(str, checkpoints.all_steps())]
        assert [p.name for p in (directory / ".qlora_jax").iterdir()] == ["journal.json"]
        lora = {"a": jnp.zeros((4, 8))}
        like = TrainState(jnp.int32(0), lora, optax.adam(1e-3).init(lora))
        for step in checkpoints.all_steps():
            state, extra = checkpoints.restore(like, step=step)
            assert int(state.step) == step == extra["step"]
            np.testing.assert_array_equal(np.asarray(state.lora["a"]), float(step))
        return checkpoints.all_steps()
    finally:
        checkpoints.close()


@pytest.mark.slow
def test_checkpoints_killed_at_random_points_of_saving_and_deleting_stay_restorable(tmp_path, capsys):
    """Five saves with keep=2 (the last three also delete one), killed at seeded random file-system changes of
    saving and of deleting: every checkpoint left restores, none committed before the kill is lost."""
    calibration = _saver(tmp_path / "calibration", -1)
    assert calibration.returncode == 0, calibration.stderr[-2000:]
    kinds = calibration.stdout.split()  # one word per file-system change: save, commit<step>, delete
    assert _check_restorable(tmp_path / "calibration", capsys) == [4, 5]
    rng = random.Random(0)
    points = sorted(
        rng.sample([i + 1 for i, k in enumerate(kinds) if k == "save"], 2)
        + rng.sample([i + 1 for i, k in enumerate(kinds) if k == "delete"], 3)
    )
    for kill_at in points:
        run = tmp_path / f"killed_at_{kill_at}"
        killed = _saver(run, kill_at)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr[-2000:])
        committed = [int(k[len("commit") :]) for k in kinds[: kill_at - 1] if k.startswith("commit")]
        steps = _check_restorable(run, capsys)
        assert steps[-1:] == committed[-1:], (kill_at, kinds[kill_at - 1], steps, committed)
        assert set(steps) >= set(committed[-2:-1]) - {0}, (kill_at, steps)  # the one kept before it, too
    # and a kill at a random time (perhaps inside tensorstore's writes, which raise no audit events)
    run = tmp_path / "timed"
    process = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(run), "-1"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "3.orbax-checkpoint-tmp").exists():
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.05))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _check_restorable(run, capsys)[-1] >= 2


def _state(step: int, value: float = 1.0):
    import jax.numpy as jnp
    import optax

    from qlora_jax.train.step import TrainState

    lora = {"a": jnp.full((4, 8), value)}
    return TrainState(jnp.int32(step), lora, optax.adam(1e-3).init(lora))


def test_checkpoints_remove_only_what_they_wrote_and_leave_everything_else(tmp_path, capsys):
    """Another trainer's orbax step (`1000/`), a user's folder (`2024/notes.txt`), an incomplete step of unknown
    origin (`22/state/`) and orbax temporaries of another program survive a run's start, its saves and its pruning,
    are named in one line, and are never read as this run's checkpoints; the unfinished save the journal names is
    removed."""
    import orbax.checkpoint as ocp

    from qlora_jax.train.run.checkpoint import CheckpointNotUsable, RunCheckpoints, complete_steps, foreign_entries

    other = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    other.save(1000, args=ocp.args.StandardSave({"w": np.ones(3)}))  # another program's orbax checkpoint
    other.close()
    (tmp_path / "2024").mkdir()
    (tmp_path / "2024" / "notes.txt").write_text("mine")
    (tmp_path / "22" / "state").mkdir(parents=True)
    (tmp_path / "7.orbax-checkpoint-tmp-1234").mkdir()
    foreign = ["1000/", "2024/", "22/", "7.orbax-checkpoint-tmp-1234/"]
    before = {str(p.relative_to(tmp_path)): p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    checkpoints = RunCheckpoints(tmp_path, keep=2)
    assert "leaving alone 4 entries this program did not write (1000/, 2024/, 22/, 7.orbax" in capsys.readouterr().out
    for step in (20, 21, 23, 24):  # saving and pruning (keep=2) among them
        checkpoints.save(_state(step), {"step": step})
    assert checkpoints.all_steps() == [23, 24] and checkpoints.latest_step() == 24
    with pytest.raises(
        CheckpointNotUsable,
        match=r"22: not a complete checkpoint of this run \(missing "
        r"_CHECKPOINT_METADATA",
    ):
        checkpoints.restore(_state(0), step=22)
    with pytest.raises(
        CheckpointNotUsable,
        match=r"1000: not a complete checkpoint of this run \(missing "
        r"state/_METADATA",
    ):
        checkpoints.restore(_state(0), step=1000)
    checkpoints.close()
    after = {str(p.relative_to(tmp_path)): p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert {k: v for k, v in after.items() if k in before} == before  # every foreign file, untouched
    assert complete_steps(tmp_path) == [23, 24] and foreign_entries(tmp_path) == foreign
    with pytest.raises(CheckpointNotUsable, match=r"2024: exists and was not written by this run"):
        RunCheckpoints(tmp_path).save(_state(2024), {})  # never saved over a foreign directory
    assert (tmp_path / "2024" / "notes.txt").read_text() == "mine"
    # an interrupted save of ours (the journal names it) is removed; the foreign entries stay
    (tmp_path / "25.orbax-checkpoint-tmp-99").mkdir()
    (tmp_path / "25").mkdir()
    (tmp_path / ".qlora_jax" / "journal.json").write_text(json.dumps({"saving": 25}))
    capsys.readouterr()
    reader = RunCheckpoints(tmp_path, read_only=True)  # a reader changes nothing
    reader.close()
    assert (tmp_path / "25").is_dir() and capsys.readouterr().out == ""
    RunCheckpoints(tmp_path).close()
    said = capsys.readouterr().out
    assert "removed what an interrupted run left: the unfinished save of step 25" in said, said
    assert not (tmp_path / "25").exists() and not (tmp_path / "25.orbax-checkpoint-tmp-99").exists()
    assert foreign_entries(tmp_path) == foreign


def test_a_flipped_byte_in_a_checkpoint_is_named_not_restored(tmp_path):
    from qlora_jax.train.run.checkpoint import CheckpointNotUsable, RunCheckpoints

    checkpoints = RunCheckpoints(tmp_path, keep=None)
    checkpoints.save(_state(5, 3.0), {"step": 5})
    state, _ = checkpoints.restore(_state(0))
    np.testing.assert_array_equal(np.asarray(state.lora["a"]), 3.0)
    data = max((p for p in (tmp_path / "5" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointNotUsable, match=rf"{data}: does not match the checksum recorded when it was saved"):
        checkpoints.restore(_state(0))
    checkpoints.close()


# ---- atomic files ------------------------------------------------------------------------------------------------


def test_files_are_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "config.json"
    files.write_text(target, "old")
    with pytest.raises(TypeError):
        files.write_bytes(target, "not bytes")  # fails while writing: the old file stays, no temporary is left
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]

    out = tmp_path / "out"
    with files.staged_directory(out) as staging:
        (staging / "a.txt").write_text("1")
        assert not out.exists()  # nothing appears until the block ends
    assert (out / "a.txt").read_text() == "1"
    (out / "mine.txt").write_text("the user's")
    with pytest.raises(RuntimeError), files.staged_directory(out) as staging:
        (staging / "a.txt").write_text("2")
        raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "1"
    with files.staged_directory(out, replaces=["b*.txt"]) as staging:
        (staging / "a.txt").write_text("3")
    assert (out / "a.txt").read_text() == "3" and (out / "mine.txt").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "out"]  # no staging directory left
    with pytest.raises(InputError, match="is an existing file, not a directory"):
        files.staged_directory(target).__enter__()


# ---- the config: clear errors, resumable fields ------------------------------------------------------------------


@pytest.mark.parametrize("text", ["- model\n- data\n", "just a string\n", "42\n"])
@pytest.mark.parametrize("command", ["train", "plan"])
def test_a_yaml_file_that_is_not_a_mapping_is_an_error_not_a_traceback(tmp_path, command, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit, match=rf"qlora-jax {command}: {path}: the top level must be a mapping"):
        cli_main([command, str(path)])


def test_config_errors_say_file_colon_field(tmp_path):
    path = tmp_path / "c.yaml"
    for raw, field in (
        ({"model": {"path": "m", "quant": "nf3"}}, "model.quant"),
        ({"model": {"path": "m"}, "train": {"output_dir": ""}}, "train.output_dir"),
        ({"model": {"path": "m"}, "train": {"divergence_factor": 0.5}}, "train.divergence_factor"),
        ({"model": {"path": "m"}, "train": {"batch_size": 3}, "mesh": {"data": 2}}, "train.batch_size"),
    ):
        path.write_text(yaml.safe_dump(raw | {"data": {"train": "t.jsonl"}}))
        with pytest.raises(ConfigFieldError) as error:
            load_config(path)
        assert str(error.value).startswith(f"{path}: {field}: "), str(error.value)


def _config(tmp_path, **sections):
    raw = {"model": {"path": str(tmp_path / "m")}, "data": {"train": str(tmp_path / "t.jsonl")}}
    for name, fields in sections.items():
        raw[name] = raw.get(name, {}) | fields
    return config_from_dict(raw)


def test_resume_names_every_field_that_cannot_change_with_both_values(tmp_path):
    stored = json.loads(json.dumps(_config(tmp_path, lora={"r": 4}).to_dict()))
    allowed = _config(
        tmp_path,
        lora={"r": 4},
        train={"steps": 500, "save_every": 10, "remat": "none"},
        optim={"learning_rate": 1e-5, "max_grad_norm": None},
        mesh={"fsdp": -1},
    )
    check_resumable(allowed, stored, source="run/config.json")
    changed = _config(tmp_path, lora={"r": 8, "lora_alpha": 32.0}, model={"quant": "fp4"}, train={"steps": 9})
    with pytest.raises(ResumeError) as error:
        check_resumable(changed, stored, source="run/config.json")
    message = str(error.value)
    for line in (
        "lora.r: 4 in the run, 8 now",
        "lora.lora_alpha: 8.0 in the run, 32.0 now",
        "model.quant: 'nf4' in the run, 'fp4' now",
        "another train.output_dir",
    ):
        assert line in message, message
    assert "train.steps" not in message and "Traceback" not in message
    assert all(field.split(".")[0] in ("train", "optim", "mesh") for field in RESUMABLE_FIELDS)


def test_resume_with_other_data_says_so_in_records(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "a"}\n' * 40)
    config = _config(tmp_path)
    before = data_fingerprint(config)
    check_same_data(data_fingerprint(config), before, source="run.json")
    data.write_text('{"text": "a"}\n' * 3)
    with pytest.raises(
        ResumeError,
        match=r"data.train: .*t.jsonl is not the file this run started with "
        r"\(run.json: 40 records, .*now 3 records",
    ):
        check_same_data(data_fingerprint(config), before, source="run.json")
    with pytest.raises(InputError, match="nope.jsonl: cannot read data.train"):
        data_fingerprint(_config(tmp_path, data={"train": str(tmp_path / "nope.jsonl")}))


# ---- divergence -------------------------------------------------------------------------------------------------


def test_divergence_rules_and_a_truthful_hint(tmp_path):
    guard = DivergenceGuard(2.0, max_grad_norm=1.0, checkpoints=tmp_path, last_saved=4)
    guard.before_save(5, loss_after=1.9, loss_before=1.0)  # worse, but within 2x
    guard.before_save(5, loss_after=0.05, loss_before=0.01)  # 5x, but far within 1 nat
    with pytest.raises(TrainingDiverged) as error:
        guard.before_save(5, loss_after=30.0, loss_before=1.0)
    message = str(error.value)
    assert "went from 1 to 30" in message and f"last good checkpoint is {tmp_path / '4'}" in message
    assert "optim.learning_rate" in message and "max_grad_norm" not in message  # clipping is already on
    with pytest.raises(TrainingDiverged, match=r"lower optim.learning_rate or set optim.max_grad_norm and run again"):
        DivergenceGuard(2.0, max_grad_norm=None, checkpoints=tmp_path, last_saved=None).after_step(1, np.nan, 1.0)
    drifting = DivergenceGuard(2.0, max_grad_norm=None, checkpoints=tmp_path, last_saved=None)
    losses = [3.0] * 16 + list(np.linspace(3.0, 9.0, 40))
    with pytest.raises(TrainingDiverged, match="median loss of the last 16 steps"):
        for step, loss in enumerate(losses):
            drifting.after_step(step, float(loss), 1.0)
    off = DivergenceGuard(0.0, max_grad_norm=None, checkpoints=tmp_path, last_saved=None)
    for step, loss in enumerate(losses):
        off.after_step(step, float(loss), 1.0)
    off.before_save(1, 1e6, 1.0)
    with pytest.raises(TrainingDiverged):
        off.before_save(1, float("inf"), 1.0)


# ---- non-finite weights: every reader names the file and tensor, no writer writes them ---------------------------


def test_non_finite_safetensors_weights_are_named_and_never_written(tmp_path):
    from safetensors.numpy import save_file

    from qlora_jax.convert.safetensors_io import CheckpointError, SafetensorsReader, write_sharded

    (tmp_path / "src").mkdir()
    save_file(
        {"good": np.ones(4, np.float32), "bad": np.array([1, np.nan, np.inf], np.float16)},
        str(tmp_path / "src" / "model.safetensors"),
    )
    reader = SafetensorsReader(tmp_path / "src")
    np.testing.assert_array_equal(reader.tensor("good"), 1)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor bad holds 1 NaN and 1 Inf of its 3 values"):
        reader.tensor("bad")
    with pytest.raises(CheckpointError, match="tensor bad holds"):
        dict(reader.tensors())
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"out: tensor w holds 1 NaN .*nothing was written"):
        write_sharded(out, [("v", np.ones(3, np.float32)), ("w", np.array([np.nan], np.float32))])
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_non_finite_bitsandbytes_statistics_are_named():
    import jax.numpy as jnp

    from qlora_jax.convert import bnb
    from qlora_jax.quant import quantize

    for double_quant, key in ((False, "w.absmax"), (True, "w.nested_absmax")):
        tensors = bnb.to_state_dict(quantize(jnp.ones((8, 64)), double_quant=double_quant), "w")
        tensors[key] = tensors[key].copy()
        tensors[key][0] = np.inf
        with pytest.raises(bnb.BnbFormatError, match=rf"{key}: holds 1 Inf"):
            bnb.from_state_dict(tensors, "w")


def test_a_gguf_tensor_that_decodes_to_nan_is_named(tmp_path):
    pytest.importorskip("gguf")
    from qlora_jax.convert.gguf import GGUFError, read_gguf

    path = tmp_path / "nan.gguf"
    bad = np.ones(8, np.float16)
    bad[3] = np.nan
    write_one_block_gguf(
        path, [("token_embd.weight", np.ones((16, 8), np.float32), None), ("blk.0.attn_norm.weight", bad, None)]
    )
    checkpoint = read_gguf(path)
    checkpoint.tensor("model.embed_tokens.weight")
    with pytest.raises(GGUFError, match=r"nan.gguf: tensor 'blk.0.attn_norm.weight' holds 1 NaN of its 8 values"):
        checkpoint.tensor("model.layers.0.input_layernorm.weight")


# ---- the CLI: errors, not tracebacks; outputs checked before any work ---------------------------------------------


def test_convert_and_merge_refuse_an_existing_file_as_output_before_loading(tmp_path):
    existing = tmp_path / "existing"
    existing.write_text("precious")
    nowhere = str(tmp_path / "no-model")  # never read: the output is checked first
    with pytest.raises(SystemExit, match="qlora-jax convert: .*existing: the output directory is an existing file"):
        cli_main(["convert", "--model", nowhere, str(existing)])
    with pytest.raises(SystemExit, match="qlora-jax merge: .*existing: the output directory is an existing file"):
        cli_main(["merge", "--model", nowhere, "--adapter", nowhere, str(existing)])
    with pytest.raises(SystemExit, match="qlora-jax merge: .*: the GGUF output is an existing directory"):
        cli_main(["merge", "--model", nowhere, "--adapter", nowhere, "--gguf", "f16", str(tmp_path)])
    with pytest.raises(SystemExit, match="qlora-jax export: .*existing: the adapter directory is an existing file"):
        cli_main(["export", str(tmp_path), str(existing)])
    assert existing.read_text() == "precious"


def test_every_error_the_library_raises_on_purpose_is_one_type():
    from qlora_jax.convert.bnb import BnbFormatError
    from qlora_jax.convert.gguf import GGUFError
    from qlora_jax.convert.peft import PeftFormatError
    from qlora_jax.convert.safetensors_io import CheckpointError
    from qlora_jax.models.config import ConfigError, UnsupportedModelError
    from qlora_jax.train.data import DataError

    for error in (
        BnbFormatError,
        GGUFError,
        PeftFormatError,
        CheckpointError,
        ConfigError,
        UnsupportedModelError,
        DataError,
        ConfigFieldError,
        ResumeError,
    ):
        assert issubclass(error, InputError) and issubclass(error, ValueError) and issubclass(error, QloraJaxError)
    assert issubclass(TrainingDiverged, QloraJaxError) and issubclass(RunDirectoryLocked, QloraJaxError)


def test_train_into_a_locked_directory_is_refused_before_reading_anything(tmp_path):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        config = tmp_path / "c.yaml"
        config.write_text(
            textwrap.dedent(f"""
            model: {{path: {tmp_path / "no-model"}}}
            data: {{train: {tmp_path / "no-data.jsonl"}}}
            train: {{output_dir: {run}}}
        """)
        )
        with pytest.raises(
            SystemExit,
            match=rf"qlora-jax train: train.output_dir {run} is in use by another training "
            rf"\(pid {holder.pid} on host",
        ):
            cli_main(["train", str(config)])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    (tmp_path / "a-file").write_text("precious")
    with pytest.raises(SystemExit, match="a-file: train.output_dir is an existing file, not a directory"):
        cli_main(["train", str(config), "--train.output_dir", str(tmp_path / "a-file")])
    assert (tmp_path / "a-file").read_text() == "precious"


def test_convert_of_a_model_with_nan_or_too_large_weights_names_them_and_writes_nothing(tmp_path):
    from safetensors.numpy import load_file, save_file

    from tests.models_util import make_tiny_model

    source = tmp_path / "model"
    make_tiny_model("llama", source)
    tensors = load_file(source / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    tensors[key][3, :5] = np.nan
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    for quant in ("none", "nf4"):  # dense (the 44 tensors of NaN) and quantized ("cannot quantize ...")
        with pytest.raises(SystemExit, match=rf"qlora-jax convert: .*model.safetensors: tensor {key} holds 5 NaN"):
            cli_main(["convert", "--model", str(source), str(out), "--quant", quant])
        assert not out.exists() and not list(tmp_path.glob(".out.*"))
    tensors[key][3, :5] = 1e6  # finite in float32, beyond float16's range
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=rf"tensor {key} holds values up to 1e\+06, beyond float16's range"):
        cli_main(["convert", "--model", str(source), str(out), "--quant", "none", "--dtype", "float16"])
    assert not out.exists()


def test_a_peft_adapter_with_nan_is_named_and_leaves_the_model_unchanged(tmp_path):
    import jax.numpy as jnp
    from flax import nnx
    from safetensors.numpy import save_file

    from qlora_jax.convert.peft import PeftFormatError, load_peft_adapter
    from qlora_jax.models import DecoderLM, ModelConfig

    config = ModelConfig.from_hf_config(
        dict(
            model_type="llama",
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    model = nnx.eval_shape(lambda: DecoderLM(config, quant=None, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    bad = np.zeros((16, 2), np.float32)
    bad[0, 0] = np.inf
    save_file(
        {f"{prefix}.lora_A.weight": np.ones((2, 16), np.float32), f"{prefix}.lora_B.weight": bad},
        str(tmp_path / "adapter_model.safetensors"),
    )
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
    )
    with pytest.raises(PeftFormatError, match=rf"adapter_model.safetensors: tensor {prefix}.lora_B.weight holds 1 Inf"):
        load_peft_adapter(model, tmp_path)
    assert model.model.layers.self_attn.q_proj.lora is None
