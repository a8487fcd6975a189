"""`train()` end to end on a tiny model with SmolLM2's tokenizer: outputs, PEFT export, kill-and-resume with
bit-identical losses (and a second `train` refused meanwhile), divergence handling, what a failed or refused
`train` leaves (nothing changed), resume checks, incomplete checkpoints, bad data lines, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from qlora_jax.cli import main as cli_main
from qlora_jax.train import build as train_build
from qlora_jax.train.config import load_config
from qlora_jax.train.loop import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _config(tmp_path, model_dir, **train_fields):
    data = ROOT / "examples" / "data"
    raw = {
        "model": {"path": str(model_dir), "quant": "nf4", "dtype": "float32"},
        "data": {
            "train": str(data / "dates_train.jsonl"),
            "eval": str(data / "dates_eval.jsonl"),
            "max_length": 64,
        },
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1},
        "optim": {"learning_rate": 3e-3, "warmup_steps": 2},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "steps": 6,
            "batch_size": 4,
            "grad_accum": 2,
            "eval_batches": 2,
            "log_every": 1,
            "remat": "none",  # remat: auto (the default) plans with two compiles per policy; tested where it matters
        }
        | train_fields,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


def test_train_end_to_end_writes_everything_and_the_adapter_loads_in_peft(tmp_path, tiny_model_dir):
    config = load_config(_config(tmp_path, tiny_model_dir, samples=["March 5, 2021"], eval_exact_match=4))
    result = train(config, progress=False)
    run = result.output_dir
    assert result.steps == 6 and len(result.train_losses) == 6
    assert result.train_losses[-1] < result.train_losses[0]
    for name in (
        "metrics.jsonl",
        "loss.png",
        "samples.json",
        "config.json",
        "run.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (run / name).is_file(), name
    assert not (run / ".lock").exists() and not [p for p in run.rglob("*") if ".partial" in p.name]
    assert (run / "checkpoints" / "6").is_dir()
    samples = json.loads((run / "samples.json").read_text())
    assert len(samples["before"]) == len(samples["after"]) == 1 and len(samples["eval_after"]) == 4
    assert result.exact_match_before is not None and result.exact_match_after is not None

    peft = pytest.importorskip("peft")
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, run / "adapter").eval()
    # PEFT on the dense base vs ours on the same dequantized base: load ours densely from the NF4 model
    from qlora_jax.convert.merge import merge_and_save

    merge_and_save(result.model, tmp_path / "merged", dtype=jnp.float32)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 49152, (1, 10))
    ours = np.asarray(result.model(jnp.asarray(tokens)))
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(tokens)).logits.numpy(), ours, atol=1e-4 * np.abs(ours).max())
        assert peft_model(torch.tensor(tokens)).logits.shape == ours.shape

    # `qlora-jax export` rebuilds the same adapter from the checkpoint alone
    from safetensors.numpy import load_file

    assert cli_main(["export", str(run), str(tmp_path / "exported")]) == 0
    written, exported = (
        load_file(run / "adapter" / "adapter_model.safetensors"),
        load_file(tmp_path / "exported" / "adapter_model.safetensors"),
    )
    assert written.keys() == exported.keys()
    for key in written:
        np.testing.assert_array_equal(written[key], exported[key], err_msg=key)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "exported" / "adapter_config.json").read_text()
    )
    with pytest.raises(SystemExit, match="no checkpoint of step 3"):
        cli_main(["export", str(run), str(tmp_path / "nope"), "--step", "3"])
    with pytest.raises(SystemExit, match="not a training run directory"):
        cli_main(["export", str(tmp_path), str(tmp_path / "nope")])
    assert not (tmp_path / "nope").exists()


def test_kill_and_resume_gives_bit_identical_losses(tmp_path, tiny_model_dir, capsys):
    uninterrupted = load_config(_config(tmp_path / "a", tiny_model_dir, save_every=1, export_peft=False, remat="auto"))
    expected = train(uninterrupted, progress=False)

    config_path = _config(tmp_path / "b", tiny_model_dir, save_every=1, export_peft=False, remat="auto")
    run = tmp_path / "b" / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "qlora_jax.cli", "train", "--no-progress", str(config_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 900  # a deadline only: a loaded machine is slow
        while time.time() < deadline and len(_losses(run) if (run / "metrics.jsonl").exists() else {}) < 2:
            time.sleep(0.05)
        # a second training of the same directory, meanwhile, is refused: the run is left alone
        with pytest.raises(SystemExit, match=rf"in use by another training \(pid {process.pid} on host "):
            cli_main(["train", str(config_path)])
        while time.time() < deadline and len(_losses(run)) < 3:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)  # mid-run, possibly mid-save
    finally:
        process.wait()
    killed_at = max(_losses(run))
    assert 3 <= killed_at < 6, killed_at
    capsys.readouterr()
    chosen = json.loads((run / "config.json").read_text())["train"]["remat"]  # remat: auto, resolved at the start
    assert chosen in ("none", "save_dots", "full"), chosen
    resumed = train(load_config(config_path), progress=False)
    out = capsys.readouterr().out
    assert f"taking over the lock left by pid {process.pid}" in out
    assert f"remat: {chosen} (auto: the policy this run was started with)" in out  # not planned again
    assert _losses(run) == _losses(tmp_path / "a" / "run")  # every step, bit for bit
    assert resumed.train_losses == expected.train_losses


def test_a_blow_up_is_not_saved_and_the_hint_resumes_from_the_last_good_checkpoint(tmp_path, tiny_model_dir):
    """A learning rate that explodes the adapters at step 2 (warmup: step 1's is 0) to |w| ~ 1e37, as in the
    report: checkpoint 1 is the last, nothing exploded is saved (the loss of a random tiny model stays near
    uniform whatever its hidden states do, so here the blow-up shows as a NaN loss of the weights to be saved), and
    doing what the message says (a lower learning rate, the same command) resumes from checkpoint 1 and trains to
    the end."""
    config_path = _config(tmp_path, tiny_model_dir, save_every=1, steps=4, export_peft=False)
    blow_up = ["--optim.learning_rate", "1e38", "--optim.warmup_steps", "4", "--optim.max_grad_norm", "null"]
    with pytest.raises(SystemExit) as error:
        cli_main(["train", "--no-progress", str(config_path), *blow_up])
    message = str(error.value)
    assert "step 2: the update blew up" in message, message
    assert f"last good checkpoint is {tmp_path / 'run' / 'checkpoints' / '1'}" in message, message
    assert "lower optim.learning_rate or set optim.max_grad_norm" in message  # clipping was off: say so
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".qlora_jax", "1"]  # its own bookkeeping, and step 1
    config = load_config(config_path, ["--optim.learning_rate", "3e-3", "--optim.warmup_steps", "4"])
    result = train(config, progress=False)
    assert result.steps == 4 and all(np.isfinite(result.train_losses))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4]  # the blown-up step 2's line is gone


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    real = train_build.make_train_step  # what make_steps, the one step builder, calls

    def poisoned(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(state, base, batch, key):
            new_state, metrics = step(state, base, batch, key)
            if int(new_state.step) == 5:
                metrics = dict(metrics, finite=np.bool_(False), loss=np.float32(np.nan))
            return new_state, metrics

        return wrapped

    monkeypatch.setattr(train_build, "make_train_step", poisoned)
    config = load_config(_config(tmp_path, tiny_model_dir, save_every=2))
    with pytest.raises(
        TrainingDiverged,
        match=r"step 5: loss nan.*last good checkpoint is .*checkpoints/4: lower "
        r"optim.learning_rate, and run",
    ):  # clipping is on: no hint to set it
        train(config, progress=False)
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """A finished 4-step run with checkpoints 2 and 4, and its config file."""
    directory = tmp_path_factory.mktemp("finished")
    config_path = _config(directory, tiny_model_dir, steps=4, save_every=2, export_peft=False)
    train(load_config(config_path), progress=False)
    return config_path, directory / "run"


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_refused_train_changes_nothing_in_the_run(finished_run, tmp_path):
    config_path, run = finished_run
    before = _snapshot(run)
    other_data = tmp_path / "other.jsonl"
    other_data.write_text("".join((ROOT / "examples/data/dates_train.jsonl").read_text().splitlines(True)[:3]))
    for overrides, expected in (
        (["--model.path", str(tmp_path / "nowhere")], rf"model.path: '.*' in the run, '{tmp_path / 'nowhere'}' now"),
        (["--lora.r", "8"], r"lora.r: 4 in the run, 8 now"),
        (
            ["--train.seed", "1", "--lora.lora_alpha", "4"],
            r"lora.lora_alpha: 8.0 in the run, 4.0 now\n"
            r"  train.seed: 0 in the run, 1 now",
        ),
        (
            ["--data.train", str(other_data)],
            r"data.train: .*other.jsonl is not the file this run started with .*now 3 "
            r"records",
        ),
        (["--train.resume", "false"], r"holds checkpoints of a run \(steps 2, 4\) and train.resume is false"),
    ):
        with pytest.raises(SystemExit, match=expected):
            cli_main(["train", "--no-progress", str(config_path), *overrides])
        assert _snapshot(run) == before, overrides
    # a new run into a new directory with a model that is not there leaves no directory behind
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit, match="nowhere"):
        cli_main(
            ["train", str(config_path), "--model.path", str(tmp_path / "nowhere"), "--train.output_dir", str(fresh)]
        )
    assert not fresh.exists()


def test_resume_with_a_changed_config_is_one_message_and_no_traceback(finished_run):
    """In a separate process: what the user sees, to the last line (no orbax internals, no asyncio noise)."""
    config_path, run = finished_run
    done = subprocess.run(
        [sys.executable, "-m", "qlora_jax.cli", "train", str(config_path), "--lora.r", "8", "--model.quant", "fp4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("qlora-jax train: train.output_dir"), done.stderr
    for expected in (
        "model.quant: 'nf4' in the run, 'fp4' now",
        "lora.r: 4 in the run, 8 now",
        "another train.output_dir",
    ):
        assert expected in done.stderr
    for noise in ("Traceback", "Event loop is closed", "ArrayRestoreArgs", "orbax"):
        assert noise not in done.stderr + done.stdout, done.stderr


def test_export_of_an_incomplete_checkpoint_is_a_clear_error(finished_run, tmp_path):
    import shutil

    _, finished = finished_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "checkpoints" / "22" / "state").mkdir(parents=True)  # what an interrupted deletion used to leave
    with pytest.raises(
        SystemExit,
        match=r"checkpoints/22: not a complete checkpoint of this run \(missing "
        r"_CHECKPOINT_METADATA",
    ):
        cli_main(["export", str(run), str(tmp_path / "out"), "--step", "22"])
    assert not (tmp_path / "out").exists()
    assert cli_main(["export", str(run), str(tmp_path / "out")]) == 0  # the latest complete one: 4
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_a_finished_run_is_replaced_only_with_overwrite_and_then_only_its_own_files(finished_run, tmp_path):
    """The issue's case: checkpoints/ deleted to save space, the run trained again (with a changed lora.r) is
    refused, every file as it was; with --overwrite it trains from step 0, and a file of the user's in the run
    directory stays."""
    import shutil

    config_path, finished = finished_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints")
    (run / "notes.txt").write_text("the user's")
    before = _snapshot(run)
    with pytest.raises(
        SystemExit,
        match=r"holds a run that trained \(loss.png, metrics.jsonl\) and has no "
        r"checkpoint to resume from \(checkpoints/ deleted\?\): a run is never "
        r"replaced without --overwrite",
    ):
        cli_main(["train", "--no-progress", str(config_path), "--train.output_dir", str(run), "--lora.r", "8"])
    assert _snapshot(run) == before
    assert (
        cli_main(
            [
                "train",
                "--no-progress",
                str(config_path),
                "--train.output_dir",
                str(run),
                "--lora.r",
                "8",
                "--train.steps",
                "2",
                "--overwrite",
            ]
        )
        == 0
    )
    assert sorted(_losses(run)) == [1, 2] and (run / "notes.txt").read_text() == "the user's"
    assert json.loads((run / "config.json").read_text())["lora"]["r"] == 8


def _launch_train(config_path: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qlora_jax.cli", "train", "--no-progress", str(config_path), *overrides],
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop_after(process: subprocess.Popen, run: Path, step: int, signum: int) -> tuple[int, str]:
    """Sends `signum` once the run has logged `step`; (exit status, stderr)."""
    deadline = time.time() + 900
    # metrics.jsonl may exist before its first loss line
    while time.time() < deadline and max((_losses(run) if (run / "metrics.jsonl").exists() else {}) or {0: 0}) < step:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=900)
    return process.returncode, stderr


def test_sigterm_and_ctrl_c_finish_the_step_save_and_name_the_step_to_resume_from(tmp_path, tiny_model_dir):
    """A real process and a real signal: SIGTERM (as a scheduler sends) stops the run after the step it is in, with
    a checkpoint of that step, the lock released, exit status 143 and one line naming the step; the same command
    resumes there, and Ctrl-C does the same (130). The losses equal an uninterrupted run's."""
    constant = ["--optim.schedule", "constant"]  # the learning rate of a step does not depend on train.steps
    config_path = _config(tmp_path, tiny_model_dir, steps=200, export_peft=False, eval_batches=1)
    run = tmp_path / "run"
    stopped = 0
    for signum, name, status in ((signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "SIGINT", 130)):
        code, stderr = _stop_after(_launch_train(config_path, *constant), run, stopped + 2, signum)
        stopped = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
        assert code == status, stderr[-3000:]
        assert stderr.strip().splitlines()[-1] == (
            f"qlora-jax train: stopped by {name} after step {stopped}; checkpoint saved at "
            f"{run / 'checkpoints' / str(stopped)}: run the same command again to resume from step {stopped}"
        ), stderr[-3000:]
        assert "Traceback" not in stderr and not (run / ".lock").exists()
        assert max(_losses(run)) == stopped
    uninterrupted = load_config(
        _config(tmp_path / "a", tiny_model_dir, steps=stopped, export_peft=False, eval_batches=1), constant
    )
    expected = train(uninterrupted, progress=False)
    assert [_losses(run)[s] for s in range(1, stopped + 1)] == expected.train_losses


def test_bad_data_line_is_named_by_the_cli(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    good = (ROOT / "examples" / "data" / "dates_train.jsonl").read_text().splitlines()[:3]
    bad.write_text(
        "\n".join(
            [
                *good,
                '{"messages": [{"role": "user", "content": "x"}',  # unclosed
            ]
        )
        + "\n"
    )
    config = _config(tmp_path, tiny_model_dir)
    with pytest.raises(SystemExit, match=r"bad.jsonl:4"):
        cli_main(["train", str(config), "--data.train", str(bad)])
    with pytest.raises(SystemExit, match=r"lora.r: expected an integer"):
        cli_main(["train", str(config), "--lora.r", "big"])


def test_offload_and_remat_options_train_the_same(tmp_path, tiny_model_dir):
    base = load_config(_config(tmp_path / "a", tiny_model_dir, steps=2, export_peft=False, remat="none"))
    offload = dataclasses.replace(
        base,
        optim=dataclasses.replace(base.optim, offload=True),
        train=dataclasses.replace(base.train, remat="full", output_dir=str(tmp_path / "b")),
    )
    a, b = train(base, progress=False), train(offload, progress=False)
    np.testing.assert_allclose(a.train_losses, b.train_losses, rtol=1e-5)


def test_the_divergence_check_scores_packed_training_rows_as_the_step_does(tmp_path, tiny_model_dir):
    """`batch_loss` (what the check before a save judges) on packed rows keeps their examples apart: it equals the
    loss of the same rows with their examples moved to rows of their own. (A regression: scored as one sequence,
    a well-trained demo model's loss jumped 50x and the run was stopped as diverged.)"""
    from qlora_jax.train import data as data_lib
    from qlora_jax.train.report import batch_loss
    from qlora_jax.train.setup import set_up

    config = load_config(_config(tmp_path, tiny_model_dir, grad_accum=1), ["--data.max_length", "256"])
    assert config.data.packing
    setup = set_up(config, verbose=False)
    rows = setup.data.rows.take(np.arange(config.train.batch_size))
    assert (rows.segment_ids.max(axis=1) > 1).any()  # several examples in a row
    examples = []
    for r in range(rows.num_rows):
        for s in range(1, int(rows.segment_ids[r].max()) + 1):
            keep = rows.segment_ids[r] == s
            examples.append(
                data_lib.Batch(*(getattr(rows, f)[r][keep] for f in ("tokens", "targets", "positions", "segment_ids")))
            )
    length = rows.tokens.shape[1]
    apart = data_lib.Batch(
        *(
            np.stack(
                [
                    np.pad(getattr(e, f), (0, length - len(e.tokens)), constant_values=-100 if f == "targets" else 0)
                    for e in examples
                ]
            )
            for f in ("tokens", "targets", "positions", "segment_ids")
        )
    )
    apart = dataclasses.replace(apart, segment_ids=np.where(apart.segment_ids > 0, 1, 0).astype(np.int32))
    # random adapters: a random tiny model's loss is near uniform whatever it attends to; these make it depend on
    # the context
    rng = np.random.default_rng(0)
    lora = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.5, x.shape), x.dtype), setup.state.lora)
    whole = batch_loss(setup, lora, rows)
    separate = sum(
        batch_loss(setup, lora, apart.take(np.arange(i, i + 1))) * int((apart.targets[i] != -100).sum())
        for i in range(apart.num_rows)
    )
    assert whole == pytest.approx(separate / int((apart.targets != -100).sum()), rel=1e-4)
