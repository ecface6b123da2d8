"""Write the date-normalisation task: samples/dates/train.jsonl and samples/dates/test.jsonl.

Each record asks for a calendar date written in one of five English styles to be rewritten as ISO 8601:

    {"prompt": "Convert to ISO date (YYYY-MM-DD): the 5th of March, 2021\\nAnswer:", "completion": " 2021-03-05"}

The data is generated here from a seeded random number generator (no outside source, nothing to license):
running this script again writes the same bytes. Test dates never occur in the training file.
SmolLM2-135M-Instruct gets the format roughly right but the year wrong (it answers 2022 or 2023 for most
dates), so exact match of the base model is near zero; a LoRA learns the task in a few minutes on a CPU.

    python samples/make_dates.py [--train 2000] [--test 200] [--seed 0] [--out samples/dates]
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
PROMPT = "Convert to ISO date (YYYY-MM-DD): {}\nAnswer:"


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


STYLES = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",                 # March 5, 2021
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",                  # 5 March 2021
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",              # Mar 5 2021
    lambda d: f"{d.day}.{d.month}.{d.year}",                              # 5.3.2021 (day first)
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",  # the 5th of March, 2021
]


def records(count: int, rng: random.Random, exclude: set[str]) -> list[dict]:
    first, span = datetime.date(1900, 1, 1).toordinal(), 200 * 365
    out = []
    while len(out) < count:
        date = datetime.date.fromordinal(first + rng.randrange(span))
        iso = date.isoformat()
        if iso in exclude:
            continue
        exclude.add(iso)
        text = rng.choice(STYLES)(date)
        out.append({"prompt": PROMPT.format(text), "completion": " " + iso})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "dates"))
    args = parser.parse_args(argv)
    rng, seen = random.Random(args.seed), set()
    test = records(args.test, rng, seen)          # drawn first: the training file never holds a test date
    train = records(args.train, rng, seen)
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    print(f"wrote {out / 'train.jsonl'} ({len(train)} records) and {out / 'test.jsonl'} ({len(test)} records)")


if __name__ == "__main__":
    main()
