"""The documentation generated from the code stays in step with it."""

from __future__ import annotations

import importlib.util
from typing import Annotated

from helpers import ROOT
from pydantic import Field, create_model

from rpo_pipeline.params import GROUPS, DpoParams, PosInt


def _script():
    spec = importlib.util.spec_from_file_location("parameters_reference", ROOT / "scripts" / "parameters_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_parameters_page_is_generated_from_the_schema_and_conf_base():
    """docs/parameters.md is what the script writes now: every key of every group, with its type,
    allowed values, conf/base default and description (rerun the script after changing either)."""
    script = _script()
    assert script.main(["--check"]) == 0
    page = (ROOT / "docs" / "parameters.md").read_text()
    assert "| `dpo.beta` | float | > 0 | `0.05` |" in page
    assert '| `dpo.loss` | str | "sigmoid" \\| "ipo" \\| "hinge" | `"sigmoid"` |' in page
    assert "| `reward_model.train.steps` | int | >= 0 | `150` | with comparisons: all, chosen on val" in page
    empty = [line for line in page.splitlines() if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not empty, empty  # every key has a description


def test_a_key_added_to_the_schema_makes_the_page_out_of_date():
    """A new schema key without the page regenerated: the rendered page differs from the committed
    one and names the key (with no default: conf/base lacks it), so the test above fails."""
    script = _script()
    grown = create_model("DpoParams", __base__=DpoParams,
                         new_knob=(Annotated[PosInt, Field(description="a new setting")], ...))
    text = script.render({**GROUPS, "dpo": grown})
    assert text != (ROOT / "docs" / "parameters.md").read_text()
    assert "| `dpo.new_knob` | int | >= 1 | missing in conf/base | a new setting |" in text
