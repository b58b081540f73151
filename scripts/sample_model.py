"""Print sampled continuations of held-out test prompts from a saved model (a quick look).

    .venv/bin/python scripts/sample_model.py [--model data/06_models/sft_model] [--n 5]

Run after `kedro run --pipelines=reference`. Uses the project's template and tokenizer.
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rpo_pipeline.text_format import SEED_TEMPLATE, Template


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="data/06_models/sft_model")
    ap.add_argument("--tokenizer", default="data/06_models/tokenizer")
    ap.add_argument("--groups", default="data/03_primary/preference_groups.parquet")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    groups = pd.read_parquet(args.groups)
    test = groups[groups["split"] == "test"].head(args.n)
    tpl = Template.parse(SEED_TEMPLATE)
    torch.manual_seed(args.seed)
    for prompt in test["prompt"]:
        text, _ = tpl.render(prompt, "")
        enc = tok(text, return_tensors="pt")
        out = model.generate(**enc, do_sample=True, top_p=1.0, top_k=0, temperature=1.0,
                             max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id)
        completion = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"PROMPT: {prompt}\n  -> {completion.strip()}\n")


if __name__ == "__main__":
    main()
