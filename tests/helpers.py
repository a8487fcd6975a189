"""Small helpers shared by the test files: no torch needed to import them (tests/models_util.py holds the ones
that need transformers)."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100  # qlora_jax.train.loss.IGNORE_INDEX, written here so that importing this module stays cheap


def random_tokens(batch: int = 2, length: int = 9, *, seed: int = 0, vocab: int = 96) -> np.ndarray:
    """[batch, length] int64 token ids in [1, vocab): 0 (the tiny families' pad id) left out."""
    return np.random.default_rng(seed).integers(1, vocab, (batch, length))


def assert_close(ours, theirs, tol: float = 2e-5) -> None:
    """Equal to `tol` times the largest magnitude of `theirs` (compared in float32), elementwise."""
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=tol * np.abs(theirs).max())


def token_batch(vocab: int, accum: int = 2, rows: int = 2, length: int = 8, *, seed: int = 0) -> dict[str, np.ndarray]:
    """A training batch of random tokens, [accum, rows, length] int32 each: next-token targets (the last position
    ignored), positions 0..length-1, one segment a row."""
    tokens = np.random.default_rng(seed).integers(0, vocab, (accum, rows, length)).astype(np.int32)
    targets = np.roll(tokens, -1, axis=-1)
    targets[..., -1] = IGNORE_INDEX
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
    return {"tokens": tokens, "targets": targets, "positions": positions, "segment_ids": np.ones_like(tokens)}


def launches_by_kind(report) -> dict[str, int]:
    """Launches of a `qlora_jax.hlo_report.LaunchReport` per kind (fusion kinds, custom call targets, copies)."""
    out: dict[str, int] = {}
    for launch in report.launches:
        out[launch.kind] = out.get(launch.kind, 0) + launch.count
    return out


def loop_with_trip_count(report, trips: int) -> str:
    """The while body of a `LaunchReport` that runs `trips` times; ValueError if none or several."""
    bodies = [body for body, n in report.trip_counts.items() if n == trips]
    if len(bodies) != 1:
        raise ValueError(f"expected one while loop of {trips} iterations, found {bodies or 'none'}")
    return bodies[0]
