"""Time ingestion + formatting of N generated HH-style pairs (goal: 100 k in <= 10 s on 2 cores).

    .venv/bin/python benchmarks/bench_ingest.py [--n 100000]

Writes a gzip jsonl of Anthropic-HH-shaped transcripts (1-4 human turns, lengths like HH's), then
times each phase of what data_processing does before tokenization: read, validate/canonicalise
(format ``hh``), split, format with the seed template. Also reports tokenization for context.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from rpo_pipeline.base_model import train_bpe_tokenizer
from rpo_pipeline.datasets import read_preference_files, write_jsonl
from rpo_pipeline.preference_groups import assign_splits, ingest
from rpo_pipeline.text_format import format_groups, tokenize_examples

WORDS = ("the a of to and in is that it for you was with on as have be at not this but they by "
         "from or one had what all were when we there can an your which their said if do will "
         "each about how up out them then she many some so these would other into has more her "
         "two like him see time could no make than first been its who now people my made over "
         "did down only way find use may water long little very after words called just where "
         "most know get through back much before go good new write our used me man too any day "
         "same right look think also around another came come work three word must because does "
         "part even place well such here take why things help put years different away again "
         "recipe movie garden dog health money travel music book advice question answer").split()


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(lo, hi))
    return " ".join(words).capitalize() + rng.choice([".", "?", "!", "."])


def hh_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        turns = []
        for t in range(rng.randint(1, 4)):
            turns.append(f"\n\nHuman: {_sentence(rng, 5, 40)} ({i})" if t == 0
                         else f"\n\nHuman: {_sentence(rng, 3, 25)}")
            turns.append(f"\n\nAssistant: {_sentence(rng, 5, 60)}")
        prefix = "".join(turns[:-1]) + "\n\nAssistant:"
        yield {"chosen": prefix + " " + _sentence(rng, 5, 60),
               "rejected": prefix + " " + _sentence(rng, 3, 50)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hh_style.jsonl.gz"
        write_jsonl(hh_rows(args.n), str(path))
        size = path.stat().st_size / 1e6
        t = {}
        t0 = time.perf_counter()
        raw = read_preference_files(str(path))
        t["read"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = ingest(raw, fmt="hh", on_invalid="drop")
        t["validate+canonicalise"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        groups = assign_splits(res.groups, {"train": 0.9, "val": 0.05, "test": 0.05}, 42)
        t["split"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        examples = format_groups(groups)
        t["format"] = time.perf_counter() - t0
        total = sum(t.values())
        tok = train_bpe_tokenizer(examples["response_text"].head(20_000), vocab_size=4096)
        t0 = time.perf_counter()
        tokenize_examples(examples, tok, 192, 256)
        t_tok = time.perf_counter() - t0
    print(f"{args.n} HH-style pairs ({size:.1f} MB gzip jsonl): rows in {res.rows_in}, "
          f"out {len(res.groups)}, dropped {len(res.dropped)}; {len(examples)} formatted examples")
    for k, v in t.items():
        print(f"  {k:<24s}{v:7.2f} s")
    print(f"  {'ingestion + formatting':<24s}{total:7.2f} s  (goal <= 10 s for 100 k)")
    print(f"  {'tokenization (extra)':<24s}{t_tok:7.2f} s")


if __name__ == "__main__":
    main()
