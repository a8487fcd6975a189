"""A small seeded mutation fuzzer for the readers' tests (tests/test_fuzz_readers.py).

Hypothesis' engine costs tens of milliseconds per example on nested inputs (measured on this project's CI
machine), so 10^4 inputs per reader would take most of an hour; this generator costs microseconds, and every
input is reproducible from (seed, index). Inputs are mutations of valid seeds (byte edits biased to headers,
"interesting" integers written over length and offset fields, truncations, insertions, splices) and random values
from each format's own vocabulary.
"""

from __future__ import annotations

import json
import math
import random
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora_jax.errors import QloraJaxError

INTERESTING_INTS = (
    0,
    1,
    2,
    3,
    7,
    8,
    255,
    256,
    2**15,
    2**16 - 1,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**63 - 1,
    2**64 - 1,
    0x7F7F7F7F,
)
WORDS = (
    "",
    "a",
    "nf4",
    "fp4",
    "none",
    "LORA",
    "q_proj",
    "weight",
    "model.layers.0",
    "float32",
    "bfloat16",
    "F32",
    "U8",
    "I64",
    "true",
    "null",
    "-1",
    "1e400",
    "\x00",
    "é",
    "\ud800",
)


class Fuzzer:
    """Random inputs from `random.Random(seed)`; `run` feeds them to a reader and allows only library errors."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def integer(self) -> int:
        r = self.rng.random()
        if r < 0.5:
            return self.rng.randint(-3, 64)
        value = self.rng.choice(INTERESTING_INTS)
        return -value if self.chance(0.2) else value

    def number(self) -> float:
        return self.rng.choice(
            [0.0, -0.0, 0.5, -1.0, 1e-8, 1e30, math.inf, -math.inf, math.nan, self.rng.gauss(0, 1e3)]
        )

    def text(self) -> str:
        if self.chance(0.6):
            return self.rng.choice(WORDS)
        return "".join(
            chr(self.rng.choice([self.rng.randint(32, 126), self.rng.randint(0, 0x2FFF)]))
            for _ in range(self.rng.randint(0, 12))
        )

    def json_value(self, depth: int = 0) -> Any:
        """A random JSON-like value (floats include NaN and Inf, which `json.dumps` writes as NaN / Infinity)."""
        kind = self.rng.randrange(8 if depth < 3 else 5)
        if kind == 0:
            return None
        if kind == 1:
            return self.chance(0.5)
        if kind == 2:
            return self.integer()
        if kind == 3:
            return self.number()
        if kind == 4:
            return self.text()
        if kind == 5:
            return [self.json_value(depth + 1) for _ in range(self.rng.randint(0, 4))]
        return {self.text(): self.json_value(depth + 1) for _ in range(self.rng.randint(0, 4))}

    def mutate_value(self, value: Any, vocabulary: dict[str, list] | None = None) -> Any:
        """`value` (a JSON-like tree) with a few of its leaves replaced, removed or added."""
        if isinstance(value, dict) and value and self.chance(0.8):
            out = dict(value)
            for _ in range(self.rng.randint(1, 3)):
                r = self.rng.random()
                key = self.rng.choice(list(out)) if out else self.text()
                if r < 0.15:
                    out.pop(key, None)
                elif r < 0.25:
                    out[self.text()] = self.json_value(1)
                elif r < 0.6 and vocabulary and key in vocabulary:
                    out[key] = self.rng.choice(vocabulary[key])
                else:
                    out[key] = self.mutate_value(out.get(key), vocabulary)
            return out
        if isinstance(value, list) and value and self.chance(0.7):
            out = list(value)
            i = self.rng.randrange(len(out))
            if self.chance(0.3):
                del out[i]
            else:
                out[i] = self.mutate_value(out[i], vocabulary)
            return out
        if isinstance(value, int) and not isinstance(value, bool) and self.chance(0.6):
            return self.integer()
        return self.json_value(1)

    def mutate_bytes(self, data: bytes, header: int | None = None) -> bytes:
        """A few byte-level edits of `data`; positions fall within its first `header` bytes half of the time."""
        out = bytearray(data)

        def position() -> int:
            limit = header if header and self.chance(0.5) else len(out)
            return self.rng.randrange(max(limit, 1))

        for _ in range(self.rng.randint(1, 4)):
            r = self.rng.random()
            if not out:
                out += bytes([self.rng.randrange(256)])
            elif r < 0.35:
                out[position() % len(out)] = self.rng.randrange(256)
            elif r < 0.6:  # an interesting integer over a length, count or offset field
                at = position() % len(out)
                width, fmt = self.rng.choice([(1, "<B"), (4, "<I"), (8, "<Q")])
                packed = struct.pack(fmt, self.rng.choice(INTERESTING_INTS) % (256**width))
                out[at : at + width] = packed
            elif r < 0.75:
                del out[self.rng.randrange(len(out)) :]  # truncation
            elif r < 0.9:
                at = position() % len(out)
                out[at:at] = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 16)))
            else:  # splice: a chunk of the data copied elsewhere
                a = self.rng.randrange(len(out))
                chunk = out[a : a + self.rng.randint(1, 32)]
                at = position() % len(out)
                out[at : at + len(chunk)] = chunk
        return bytes(out)


def run(
    name: str, count: int, seed: int, make: Callable[[Fuzzer], Any], read: Callable[[Any], None], *, failures: Path
) -> Counter:
    """Feeds `count` inputs from `make` to `read`. Any exception that is not a `QloraJaxError` fails the test with
    the input's index (and the input, saved under `failures`). Returns how often each outcome happened."""
    fuzzer = Fuzzer(seed)
    outcomes: Counter = Counter()
    for index in range(count):
        data = make(fuzzer)
        try:
            read(data)
            outcomes["accepted"] += 1
        except QloraJaxError as e:
            outcomes[type(e).__name__] += 1
        except Exception as e:  # noqa: BLE001 -- exactly what the fuzzer looks for
            failures.mkdir(parents=True, exist_ok=True)
            saved = failures / f"{name}-{seed}-{index}"
            saved.write_text(repr(data) if not isinstance(data, bytes) else data.hex())
            raise AssertionError(
                f"{name} input {index} (seed {seed}, saved in {saved}) raised {type(e).__name__}: {e}"
            ) from e
    return outcomes


def dumps(value: Any) -> str:
    """JSON text of a fuzzed value (NaN / Infinity allowed, lone surrogates escaped)."""
    return json.dumps(value)
