"""QLoRA training: data, chunked loss, optimizer over the adapters, the jitted step, and the `train` driver."""

from qlora_jax.train.config import TrainConfig, load_config
from qlora_jax.train.data import Batch, BatchIterator, DataError, load_examples, pack_examples, pad_examples
from qlora_jax.train.loop import TrainingDiverged, TrainResult, train
from qlora_jax.train.loss import IGNORE_INDEX, chunked_cross_entropy
from qlora_jax.train.optim import OptimConfig, learning_rate_schedule, make_optimizer
from qlora_jax.train.report import exact_match
from qlora_jax.train.step import TrainState, make_eval_step, make_train_step

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "BatchIterator",
    "DataError",
    "OptimConfig",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "TrainingDiverged",
    "chunked_cross_entropy",
    "exact_match",
    "learning_rate_schedule",
    "load_config",
    "load_examples",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "pack_examples",
    "pad_examples",
    "train",
]
