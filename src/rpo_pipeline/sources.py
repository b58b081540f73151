"""Where a model named in the parameters comes from: a local directory, a Hugging Face Hub id or a
registered ``models:/`` URI; and, before any node runs, whether a Hub id can be had here.

Kedro-free, torch-free (``huggingface_hub`` only).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rpo_pipeline.constants import BUILTIN_TINY_GPT2

MODELS_URI = "models:/"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_NOT_MODELS = ("sft", "base")  # reward_model.backbone's own choices
# Parameters that name a model: (key, value getter); a getter gives None where the key is unused.
MODEL_KEYS: dict[str, Any] = {
    "base_model.name_or_path": lambda p: p["base_model"]["name_or_path"],
    "reward_model.backbone": lambda p: p["reward_model"]["backbone"],
    "evaluation.gold_judge_args.model": lambda p: p["evaluation"]["gold_judge_args"]["model"],
}


def is_hub_id(value: str) -> bool:
    """A Hub id (``gpt2``, ``org/name``): not a local directory, a ``models:/`` URI, the builtin
    model or one of ``sft`` / ``base``."""
    return (bool(_HUB_ID.match(value)) and value not in _NOT_MODELS and value != BUILTIN_TINY_GPT2
            and not Path(value).exists())


def hub_offline() -> bool:
    """The Hub is switched off for this process (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cached(hub_id: str) -> bool:
    """The id's ``config.json`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache  # only for a Hub id

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def hub_revision(hub_id: str) -> str | None:
    """The commit ``hub_id`` resolves to: its snapshot in the local cache, else the Hub's current
    one when it can be asked, else None."""
    from huggingface_hub import HfApi, snapshot_download  # only for a Hub id

    try:
        return Path(snapshot_download(hub_id, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not cached here: ask the Hub
        if hub_offline():
            return None
        try:
            return HfApi().model_info(hub_id).sha
        except Exception:  # noqa: BLE001 - unreachable: the check before the run says so
            return None


def unavailable_models(params: Mapping[str, Any]) -> list[str]:
    """One message per parameter naming a Hub id that this machine can neither read from its
    cache nor download: what ``hooks.ValidateParameters`` refuses before any node runs."""
    problems, reachable = [], None
    for key, get in MODEL_KEYS.items():
        try:
            value = get(params)
        except (KeyError, TypeError):
            continue
        if not isinstance(value, str) or not is_hub_id(value) or hub_cached(value):
            continue
        if hub_offline():
            why = "HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set"
        else:
            reachable = hub_reachable() if reachable is None else reachable
            if reachable:
                continue
            why = "huggingface.co cannot be reached"
        problems.append(f"{key} = {value!r} is a Hugging Face Hub id that is not in the local Hugging "
                        f"Face cache, and {why}: this run needs the model locally or network access. "
                        f"Download it where the Hub is reachable (`hf download {value}`) and copy the "
                        f"cache here, or set {key} to a local directory")
    return problems
