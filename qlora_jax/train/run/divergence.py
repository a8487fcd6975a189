"""When to stop a run that diverges, so that its last checkpoint is one worth resuming from.

The rules (docs/config.md, `train.divergence_factor` = k, default 2; 0 turns the last two off):

1. every step: a non-finite loss or gradient norm stops the run; the step's update is not applied.
2. before every checkpoint: the loss of the weights about to be saved is measured on the batch of the step that
   produced them (one forward pass, no dropout). If it is not finite, or more than k times and more than 1 nat per
   token above that batch's loss before the step, the update blew up: nothing is saved and the run stops.
3. every step: the median loss of the last 16 steps is compared with the lowest such median of the run (since it
   started or resumed); more than k times and 1 nat above it, the run has drifted away and stops (before a save at
   that step).

A step's own batch is the fairest judge of its update (rule 2): one gradient step on it should not make it worse,
let alone k times worse, whatever the batch's difficulty. The 1-nat margin keeps tiny late-training losses
(0.01 -> 0.03) from counting as divergence. The error names the last checkpoint saved, which passed rule 2.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from pathlib import Path

from qlora_jax.errors import QloraJaxError

__all__ = ["TrainingDiverged", "DivergenceGuard", "WINDOW", "MARGIN"]

WINDOW = 16  # steps of the running median (rule 3)
MARGIN = 1.0  # nats per token a loss must also exceed its reference by (rules 2 and 3)


class TrainingDiverged(QloraJaxError, RuntimeError):
    """The loss or the gradients became non-finite, or the loss blew up; the run stopped, nothing bad was saved."""


class DivergenceGuard:
    """Applies the rules above to one run; its methods raise TrainingDiverged with the message the user sees.

    `checkpoints`: the run's checkpoint directory (for the message); `last_saved`: the last checkpoint's step.
    """

    def __init__(self, factor: float, *, max_grad_norm: float | None, checkpoints: Path, last_saved: int | None):
        self.factor, self.max_grad_norm = factor, max_grad_norm
        self.checkpoints, self.last_saved = checkpoints, last_saved
        self._losses: deque[float] = deque(maxlen=WINDOW)
        self._best_median = math.inf

    def _exceeds(self, loss: float, reference: float) -> bool:
        return bool(self.factor) and loss > self.factor * reference and loss > reference + MARGIN

    def after_step(self, step: int, loss: float, grad_norm: float) -> None:
        """Rules 1 and 3 for the step that just ran (`loss`, `grad_norm`: its metrics)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise self._stop(f"step {step}: loss {loss}, gradient norm {grad_norm}; stopped without applying it")
        self._losses.append(loss)
        if len(self._losses) < WINDOW:
            return
        median = statistics.median(self._losses)
        if self._exceeds(median, self._best_median):
            raise self._stop(
                f"step {step}: the median loss of the last {WINDOW} steps is {median:.4g}, up from "
                f"{self._best_median:.4g} (more than train.divergence_factor={self.factor:g} times, and "
                f"{MARGIN:g} nat, above it)"
            )
        self._best_median = min(self._best_median, median)

    def before_save(self, step: int, loss_after: float, loss_before: float) -> None:
        """Rule 2 for the state of `step`: `loss_after` is its loss on the step's batch, `loss_before` the step's."""
        if not math.isfinite(loss_after) or self._exceeds(loss_after, loss_before):
            raise self._stop(
                f"step {step}: the update blew up: its batch's loss went from {loss_before:.4g} to {loss_after:.4g} "
                f"(limit: train.divergence_factor={self.factor:g} times, and {MARGIN:g} nat, above it); not saved"
            )

    def saved(self, step: int) -> None:
        self.last_saved = step

    def _stop(self, what: str) -> TrainingDiverged:
        lower = "lower optim.learning_rate" + (" or set optim.max_grad_norm" if self.max_grad_norm is None else "")
        if self.last_saved is None:
            return TrainingDiverged(f"{what}. No checkpoint was written yet: {lower} and run again.")
        return TrainingDiverged(
            f"{what}. The last good checkpoint is {self.checkpoints / str(self.last_saved)}: {lower}, and run the "
            "same command again to resume from it (optim.* may change on resume)."
        )
