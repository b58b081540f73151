"""Write conf/base/catalog_generated.yml: the catalog entries of ``--pipelines=generated``.

That pipeline runs every stage after preference generation under the namespace ``generated``, so
its models, caches and reports never overwrite the default pipeline's. Each of its entries is the
default entry it mirrors (``catalog.yml``, entry or pattern) with:

* the name prefixed ``generated.``;
* files under a ``generated/`` folder of the same data layer (``data/06_models/generated/...``);
* registered MLflow models named ``rpo_pipeline.generated.<name>``.

MLflow metrics and artifacts keep their names: a generated run is its own MLflow run.

    python scripts/generated_catalog.py          # rewrite the file
    python scripts/generated_catalog.py --check  # exit 1 when it is out of date (tests run this)
"""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module below
from generated_file import write_or_check  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE, TARGET = ROOT / "conf/base/catalog.yml", ROOT / "conf/base/catalog_generated.yml"
PREFIX = "generated."
HEADER = ("# Written by scripts/generated_catalog.py from catalog.yml: do not edit; rerun the script.\n"
          "# The outputs of --pipelines=generated (namespace `generated`), beside the default ones.\n")


def _matches(pattern: str, name: str) -> bool:
    regex = "^" + re.sub(r"\\\{[^}]+\\\}", ".+", re.escape(pattern)) + "$"
    return re.match(regex, name) is not None


def _specificity(pattern: str) -> tuple[int, int]:
    """Kedro's order among matching patterns: more literal characters, then fewer placeholders."""
    return len(re.sub(r"\{[^}]+\}", "", pattern)), -pattern.count("{")


def _moved(path: str) -> str:
    """``data/06_models/x`` -> ``data/06_models/generated/x``."""
    parts = path.split("/")
    return "/".join([*parts[:2], "generated", *parts[2:]]) if parts[0] == "data" else path


def mirror(entry: dict) -> dict:
    out = copy.deepcopy(entry)
    for holder in (out, out.get("dataset") or {}):
        if "filepath" in holder:
            holder["filepath"] = _moved(holder["filepath"])
        if "also" in holder:
            holder["also"] = [_moved(p) for p in holder["also"]]
    save = out.get("save_args") or {}
    if "registered_model_name" in save:
        name = save["registered_model_name"]
        save["registered_model_name"] = name.replace("rpo_pipeline.", f"rpo_pipeline.{PREFIX}", 1)
    return out


def generated_entries(needed: set[str]) -> dict[str, dict]:
    """The mirrored entries every name of ``needed`` (``generated.*`` datasets) resolves to."""
    catalog = yaml.safe_load(SOURCE.read_text())
    out: dict[str, dict] = {}
    for name in sorted(needed):
        base = name.removeprefix(PREFIX)
        if name in catalog:  # written by generate_preferences, already in catalog.yml
            continue
        # as Kedro resolves a name: the entry, else the most specific pattern that matches it
        patterns = [k for k in catalog if "{" in k and _matches(k, base)]
        key = base if base in catalog else max(patterns, key=_specificity, default=None)
        if key is not None:
            out[PREFIX + key] = mirror(catalog[key])
    return dict(sorted(out.items()))


def needed_names() -> set[str]:
    """The ``generated.*`` datasets of the pipeline in every shape (refresh on and off, either
    judge): the catalog must hold whichever a run's parameters build."""
    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
    from kedro.framework.project import pipelines
    from kedro.framework.startup import bootstrap_project

    from rpo_pipeline.params import base_parameters
    from rpo_pipeline.pipeline_registry import configure_run_shape

    bootstrap_project(ROOT)
    names: set[str] = set()
    for labels in (0, 1):
        for judge in ("gold", "reward_model"):
            online = base_parameters("rpo_online", ROOT / "conf")
            online["refresh"]["labels_per_round"] = labels
            configure_run_shape({"rpo_online": online, "generate_preferences": {"judge": judge}})
            names |= {d for d in pipelines["generated"].datasets() if d.startswith(PREFIX)}
    return names


def render(entries: dict[str, dict]) -> str:
    return HEADER + "\n".join(yaml.safe_dump({k: v}, sort_keys=False, width=120) for k, v in entries.items())


def main(argv: list[str] | None = None) -> int:
    return write_or_check(TARGET, lambda: render(generated_entries(needed_names())), __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
