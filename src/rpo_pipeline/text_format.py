"""Format groups into (prompt text, response text) and tokenize with the prompt boundary kept.

Kedro-free. The prompt/response boundary is exact by construction: prompt and response are
tokenized separately and concatenated, and the prompt part of the template ends where the
pre-tokenizer splits anyway (the whitespace before ``{response}`` belongs to the response), so
tokenizing the joined text gives the same ids.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass

import pandas as pd

SEED_TEMPLATE = "prompt : {prompt} [SEP] response : {response}"


@dataclass(frozen=True)
class Template:
    """A ``{prompt}``/``{response}`` template split at the response."""

    prefix: str  # contains {prompt}; ends without trailing whitespace
    gap: str  # whitespace between prefix and response; belongs to the response
    suffix: str  # text after {response}

    @classmethod
    def parse(cls, template: str) -> Template:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        if sorted(fields) != ["prompt", "response"]:
            raise ValueError(
                f"template must contain {{prompt}} and {{response}} once each and no other "
                f"fields, got {fields} in {template!r}")
        head, suffix = template.split("{response}")
        if "{prompt}" not in head:
            raise ValueError(f"template must put {{prompt}} before {{response}}: {template!r}")
        prefix = head.rstrip()
        return cls(prefix, head[len(prefix):], suffix)

    def render(self, prompt: str, response: str) -> tuple[str, str]:
        return self.prefix.replace("{prompt}", prompt), self.gap + response + self.suffix


def chat_format(tokenizer, messages: list[dict[str, str]], response: str) -> tuple[str, str]:
    """Prompt and response text from the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "data_processing.use_chat_template is true but the tokenizer has no chat template; "
            "use a chat model's tokenizer or the plain template")
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                         tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently once a response follows;"
                         " cannot place the prompt/response boundary")
    return prompt, full[len(prompt):]


def format_groups(groups: pd.DataFrame, template: str = SEED_TEMPLATE,
                  use_chat_template: bool = False, tokenizer=None) -> pd.DataFrame:
    """One row per response: group_id, response_index, split, prompt_text, response_text."""
    tpl = None if use_chat_template else Template.parse(template)
    recs = []
    has_split = "split" in groups.columns
    for row in groups.itertuples(index=False):
        for k, response in enumerate(row.responses):
            if tpl is not None:
                p, r = tpl.render(row.prompt, response)
            else:
                msgs = (json.loads(row.prompt_messages) if row.prompt_messages
                        else [{"role": "user", "content": row.prompt}])
                p, r = chat_format(tokenizer, msgs, response)
            recs.append((row.group_id, k, row.split if has_split else None, p, r))
    return pd.DataFrame(recs, columns=["group_id", "response_index", "split", "prompt_text",
                                       "response_text"])


def format_prompts(groups: pd.DataFrame, template: str = SEED_TEMPLATE,
                   use_chat_template: bool = False, tokenizer=None) -> pd.DataFrame:
    """One row per group, responses or not: group_id, split, prompt_text (as ``format_groups``
    renders the prompt, so its tokens equal the prompt part of every response's row)."""
    tpl = None if use_chat_template else Template.parse(template)
    recs = []
    for row in groups.itertuples(index=False):
        if tpl is not None:
            text = tpl.prefix.replace("{prompt}", row.prompt)
        else:
            msgs = (json.loads(row.prompt_messages) if row.prompt_messages
                    else [{"role": "user", "content": row.prompt}])
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("data_processing.use_chat_template is true but the tokenizer has "
                                 "no chat template; use a chat model's tokenizer or the plain template")
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        recs.append((row.group_id, row.split, text))
    return pd.DataFrame(recs, columns=["group_id", "split", "prompt_text"])


def format_sft_targets(groups: pd.DataFrame, template: str = SEED_TEMPLATE,
                       use_chat_template: bool = False, tokenizer=None) -> pd.DataFrame:
    """The ``sft_target`` of each group that has one (format ``text``), as ``format_groups`` rows
    with ``response_index`` -1: the continuation SFT learns, never a preference response."""
    has = groups[groups["sft_target"].notna()] if "sft_target" in groups.columns else groups.iloc[:0]
    rows = has.assign(responses=[[t] for t in has["sft_target"]])
    out = format_groups(rows, template, use_chat_template, tokenizer)
    out["response_index"] = -1
    return out


def tokenize_prompts(prompts: pd.DataFrame, tokenizer, max_prompt_length: int,
                     chat_template: bool = False) -> pd.DataFrame:
    """Prompt token ids per group, left-truncated to ``max_prompt_length`` as in
    ``tokenize_examples``: group_id, split, prompt_ids, prompt_truncated."""
    texts = prompts["prompt_text"].tolist()
    ids = tokenizer(texts, add_special_tokens=not chat_template, verbose=False)["input_ids"] \
        if texts else []
    out = prompts[["group_id", "split"]].copy()
    out["prompt_ids"] = [list(p[-max_prompt_length:]) for p in ids]
    out["prompt_truncated"] = [len(p) > max_prompt_length for p in ids]
    return out.reset_index(drop=True)


def tokenize_examples(examples: pd.DataFrame, tokenizer, max_prompt_length: int, max_length: int,
                      add_eos: bool = True, chat_template: bool = False) -> pd.DataFrame:
    """Token ids of prompt + response with the response start index.

    The prompt keeps its end (left-truncated to ``max_prompt_length``); the response is cut at the
    end so the sequence fits ``max_length``. EOS is appended to the response before truncation.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length "
                         f"({max_length})")
    if examples.empty:
        return examples[["group_id", "response_index", "split"]].assign(
            input_ids=[], response_start=[], length=[], prompt_truncated=[], response_truncated=[])
    # chat templates already carry BOS and other special tokens as text
    # each distinct prompt once (a group's K responses share it); verbose=False: lengths beyond
    # model_max_length are expected here, truncation follows
    prompts = examples["prompt_text"].tolist()
    unique = list(dict.fromkeys(prompts))
    ids = tokenizer(unique, add_special_tokens=not chat_template, verbose=False)["input_ids"]
    by_text = dict(zip(unique, ids, strict=True))
    p_ids = [by_text[p] for p in prompts]
    r_ids = tokenizer(examples["response_text"].tolist(), add_special_tokens=False,
                      verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id if add_eos else None
    input_ids, starts, p_trunc, r_trunc = [], [], [], []
    for p, r in zip(p_ids, r_ids, strict=True):
        if eos is not None:
            r = r + [eos]
        pt = len(p) > max_prompt_length
        if pt:
            p = p[-max_prompt_length:]
        budget = max_length - len(p)
        rt = len(r) > budget
        if rt:
            r = r[:budget]
        input_ids.append(p + r)
        starts.append(len(p))
        p_trunc.append(pt)
        r_trunc.append(rt)
    out = examples[["group_id", "response_index", "split"]].copy()
    out["input_ids"] = input_ids
    out["response_start"] = starts
    out["length"] = [len(x) for x in input_ids]
    out["prompt_truncated"] = p_trunc
    out["response_truncated"] = r_trunc
    return out
