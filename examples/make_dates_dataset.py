"""Writes the demo dataset: dates in everyday English formats, to be rewritten as ISO 8601 (YYYY-MM-DD).

    python examples/make_dates_dataset.py   # writes examples/data/dates_{train,eval}.jsonl (committed)

SmolLM2-135M-Instruct answers none of these right out of the box (it echoes the date or invents one); a few
minutes of QLoRA on a CPU teach it. Deterministic: the same files every time.
"""

from __future__ import annotations

import calendar
import json
import random
from pathlib import Path

SYSTEM = "Rewrite the date in ISO 8601 format (YYYY-MM-DD). Reply with the date only."
MONTHS = list(calendar.month_name)[1:]


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def spoken(year: int, month: int, day: int, rng: random.Random) -> str:
    name = MONTHS[month - 1]
    short = name[:3]
    forms = [
        f"{name} {day}, {year}",
        f"{day} {name} {year}",
        f"{short} {day} {year}",
        f"{day} {short} {year}",
        f"the {ordinal(day)} of {name}, {year}",
        f"{name} {ordinal(day)}, {year}",
        f"{calendar.day_name[calendar.weekday(year, month, day)]}, {name} {day}, {year}",
    ]
    return rng.choice(forms)


def records(count: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """`count` examples; no date in `exclude` (ISO strings), so that eval dates never occur in training."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        year = rng.randint(1900, 2099)
        month = rng.randint(1, 12)
        day = rng.randint(1, calendar.monthrange(year, month)[1])
        if f"{year:04d}-{month:02d}-{day:02d}" in exclude:
            continue
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": spoken(year, month, day, rng)},
            {"role": "assistant", "content": f"{year:04d}-{month:02d}-{day:02d}"},
        ]
        out.append({"messages": messages})
    return out


def main() -> None:
    directory = Path(__file__).parent / "data"
    directory.mkdir(exist_ok=True)
    train = records(2000, seed=0)
    seen = {r["messages"][-1]["content"] for r in train}
    for name, rows in (("train", train), ("eval", records(100, seed=1, exclude=seen))):
        path = directory / f"dates_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {path} ({len(rows)} records)")


if __name__ == "__main__":
    main()
