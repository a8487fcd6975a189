"""What a run computes with: the 4-bit model with adapters, the tokenized data, the placement on the devices, the
optimizer and the jitted steps, built from a `TrainConfig` by `set_up`.

Nothing here writes a file: `train()` (loop.py) decides what goes to `train.output_dir` and when.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qlora_jax.convert.hf import load_pretrained
from qlora_jax.lora import apply_lora, loftq_initialize
from qlora_jax.models import ComputeOptions, DecoderLM, read_model_config
from qlora_jax.parallel.placement import global_batch, place
from qlora_jax.tokenizer import check_token_ids, load_tokenizer
from qlora_jax.tokens import resize_token_embeddings
from qlora_jax.train import data as data_lib
from qlora_jax.train.build import make_steps, quant_config, run_optimizer, run_vocab_size
from qlora_jax.train.config import TrainConfig, resolve_package_path
from qlora_jax.train.loss import IGNORE_INDEX
from qlora_jax.train.parallel import StepShardings, configured_mesh, step_shardings
from qlora_jax.train.plan import resolve_remat
from qlora_jax.train.step import BATCH_FIELDS, TrainState

__all__ = [
    "RunData",
    "TrainingSetup",
    "load_model_for_training",
    "load_run_tokenizer",
    "load_data",
    "check_vocabulary",
    "set_up",
]


def load_run_tokenizer(config: TrainConfig) -> Any:
    """The tokenizer of `model.tokenizer`, else the one beside (or inside, for a GGUF) `model.path`."""
    m = config.model
    return load_tokenizer(resolve_package_path(m.tokenizer or m.path))


def load_model_for_training(config: TrainConfig) -> DecoderLM:
    """The base model (quantized as configured), with adapters added (LoftQ-initialized if asked)."""
    m = config.model
    path = resolve_package_path(m.path)
    quant = quant_config(config)
    model, _ = load_pretrained(path, quantization=quant, dtype=jnp.dtype(m.dtype))
    if m.resize_token_embeddings is not None:  # added tokens: new rows, before the adapters (qlora_jax.tokens)
        resize_token_embeddings(model, m.resize_token_embeddings)
    if config.lora.init_lora_weights == "loftq":
        if quant is None:
            raise ValueError("lora.init_lora_weights=loftq needs a quantized base (model.quant != none)")
        from qlora_jax.convert.hf import tensor_source

        errors = loftq_initialize(model, tensor_source(path), config.lora)
        plain = math.sqrt(sum(p**2 for p, _ in errors.values()))
        loftq = math.sqrt(sum(q**2 for _, q in errors.values()))
        print(f"LoftQ: ||W - (Q + sBA)||_F over adapted weights: {loftq:.4f} (plain init {plain:.4f})")
    else:
        apply_lora(model, config.lora, rngs=nnx.Rngs(config.train.seed))
    return model


@dataclasses.dataclass(frozen=True)
class RunData:
    """The tokenized data of a run: train rows, eval rows (None: no evaluation), and the eval records (for
    exact-match scoring)."""

    rows: data_lib.Batch
    eval_rows: data_lib.Batch | None
    eval_records: list[dict]


def check_vocabulary(config: TrainConfig, data: RunData, tokenizer) -> None:
    """Every token id of the data has a row in the run's embedding (the model's, or `model.resize_token_embeddings`):
    else `qlora_jax.tokenizer.TokenIdError` naming the ids, the rows and the setting to change, before any weight
    is read or any step compiled."""
    vocab = run_vocab_size(config, read_model_config(resolve_package_path(config.model.path)).vocab_size)
    d = config.data
    for rows, where in ((data.rows, f"data.train ({d.train})"), (data.eval_rows, f"data.eval ({d.eval or d.train})")):
        if rows is None:
            continue
        check_token_ids(
            rows.tokens,
            vocab,
            where,
            fix=f"the tokenizer has {len(tokenizer)} tokens: set model.resize_token_embeddings: "
            f"{max(len(tokenizer), vocab)} and train the new rows (lora.trainable_token_indices; "
            "docs/lora.md#added-tokens)",
        )


def load_data(config: TrainConfig, tokenizer) -> RunData:
    """Reads, tokenizes and packs (or pads) `data.train`, and the eval set (`data.eval`, or a split of train)."""
    d = config.data
    kwargs = dict(max_length=d.max_length, loss_on=d.loss_on)
    train_examples = data_lib.load_examples(d.train, tokenizer, **kwargs)
    eval_records: list[dict] = []
    if d.eval:
        eval_examples = data_lib.load_examples(d.eval, tokenizer, **kwargs)
        eval_records = [record for _, record in data_lib.read_jsonl(d.eval)]
    elif d.eval_fraction > 0:
        train_examples, eval_examples = data_lib.split_train_eval(
            train_examples, eval_fraction=d.eval_fraction, seed=d.seed
        )
    else:
        eval_examples = []
    rows = (data_lib.pack_examples if d.packing else data_lib.pad_examples)(train_examples, d.max_length)
    eval_rows = data_lib.pad_examples(eval_examples, d.max_length) if eval_examples else None
    return RunData(rows, eval_rows, eval_records)


@dataclasses.dataclass
class TrainingSetup:
    """Everything the step loop and the reports compute with; `state` is the initial (not yet resumed) state."""

    config: TrainConfig
    model: DecoderLM  # the model whose adapters are `state.lora` at start (merge graphdef + lora + base later)
    tokenizer: Any
    data: RunData
    graphdef: nnx.GraphDef
    base: Any  # the frozen weights (nnx.State), placed
    optimizer: optax.GradientTransformation
    state: TrainState
    train_step: Any  # (state, base, batch, key) -> (state, metrics)
    eval_step: Any  # (lora, base, batch) -> (loss_sum, tokens)
    options: ComputeOptions
    shardings: StepShardings | None  # None: one device

    @property
    def batch_sharding(self):
        return None if self.shardings is None else self.shardings.batch

    @property
    def eval_sharding(self):
        return None if self.shardings is None else self.shardings.eval_batch

    @property
    def state_shardings(self) -> TrainState | None:
        return None if self.shardings is None else self.shardings.state

    def model_with(self, lora) -> DecoderLM:
        """The model with these adapters (sharing the base weights)."""
        return nnx.merge(self.graphdef, lora, self.base)

    def step_batch(self, batch: data_lib.Batch) -> dict[str, jax.Array]:
        """[accum, micro, T] arrays; on a mesh, global arrays of which this process supplies its devices' rows."""
        accum = self.config.train.grad_accum
        arrays = {f: getattr(batch, f).reshape(accum, -1, getattr(batch, f).shape[-1]) for f in BATCH_FIELDS}
        if self.batch_sharding is not None:
            return global_batch(arrays, self.batch_sharding)
        return {f: jnp.asarray(a) for f, a in arrays.items()}

    def eval_batches(self, rows: data_lib.Batch, batch_size: int, max_batches: int = 0):
        """Batches of `batch_size` rows of `rows` for `eval_step` (at most `max_batches`; 0: all)."""
        n = rows.tokens.shape[0]
        for i, start in enumerate(range(0, n, batch_size)):
            if max_batches and i >= max_batches:
                return
            arrays = {f: getattr(rows, f)[start : start + batch_size] for f in BATCH_FIELDS}
            if self.eval_sharding is None:
                yield {f: jnp.asarray(a) for f, a in arrays.items()}
            else:  # every eval batch has the same rows, split over the mesh
                yield global_batch(_padded_rows(arrays, batch_size), self.eval_sharding)


def _padded_rows(arrays: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The batch filled up to `rows` with copies of its first row that have no targets (they add nothing)."""
    missing = rows - arrays["tokens"].shape[0]
    if missing <= 0:
        return arrays
    out = {f: np.concatenate([a, np.repeat(a[:1], missing, axis=0)]) for f, a in arrays.items()}
    out["targets"][-missing:] = IGNORE_INDEX
    return out


def set_up(config: TrainConfig, *, verbose: bool = True, remat: str | None = None) -> TrainingSetup:
    """Reads the data, then loads the model, places both (on `mesh` if configured) and compiles nothing yet: the
    steps are jitted on their first call. `train.remat: auto` is resolved after the data is read and before the
    model takes device memory: to `remat` when given (a resumed run keeps the policy it ran with), else to the
    memory planner's choice (`plan.resolve_remat`); the setup's config holds the policy. `verbose`: print the
    choice, the trainable parameters and the mesh."""
    from qlora_jax.lora import trainable_parameters

    mesh = configured_mesh(config)
    tokenizer = load_run_tokenizer(config)
    data = load_data(config, tokenizer)  # bad data fails here, before any slow work
    check_vocabulary(config, data, tokenizer)
    if data.rows.num_rows < config.train.batch_size:
        how = "packed into" if config.data.packing else "one example a row, in"
        raise data_lib.DataError(
            f"train.batch_size: {config.train.batch_size} rows a step, but {config.data.train} gives only "
            f"{data.rows.num_rows} rows ({how} rows of data.max_length={config.data.max_length} tokens): every batch "
            "would hold some rows twice; lower train.batch_size, or give more data"
        )
    if config.train.remat == "auto" and remat is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, remat=remat))
        if verbose:
            print(f"remat: {remat} (auto: the policy this run was started with)")
    config, remat_choice = resolve_remat(config)
    if remat_choice is not None and verbose:
        print(remat_choice.explain())
    model = load_model_for_training(config)
    if config.data.max_length > model.config.max_position_embeddings:
        print(
            f"warning: data.max_length={config.data.max_length} is beyond the model's "
            f"{model.config.max_position_embeddings} positions (max_position_embeddings): longer examples train "
            "at positions it was not trained for"
        )
    if verbose:
        trainable_parameters(model)
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    optimizer = run_optimizer(config)
    shardings: StepShardings | None = None
    if mesh is not None:
        quant = quant_config(config)
        shardings = step_shardings(
            mesh,
            lora,
            base,
            optimizer,
            offload=config.optim.offload,
            expert_parallel=config.mesh.expert_parallel,
            dq_blocksize=quant.dq_blocksize if quant else 256,
        )
        del model  # its single-device copy of the weights goes with it
        lora, base = place(lora, shardings.state.lora), place(base, shardings.base)
        model = nnx.merge(graphdef, lora, base)
        if verbose:
            print(
                f"mesh: data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} over {mesh.size} devices, "
                f"{jax.process_count()} process(es)"
            )
    state = TrainState.create(
        lora, optimizer, offload=config.optim.offload, shardings=None if shardings is None else shardings.state
    )
    steps = make_steps(config, graphdef, optimizer, vocab_size=model.config.vocab_size, shardings=shardings)
    return TrainingSetup(
        config,
        model,
        tokenizer,
        data,
        graphdef,
        base,
        optimizer,
        state,
        steps.train_step,
        steps.eval_step,
        steps.options,
        shardings,
    )
