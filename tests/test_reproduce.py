"""`make reproduce` (scripts/reproduce.py): identical metrics on the same machine class, stated
tolerances on another, a readable table of what moved; the README's table comes from its file.
`make gpu-check` (scripts/gpu_check.py) resolves every path in its dry mode."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from helpers import ROOT, TINY_RUN


def _script(name: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


reproduce = _script("reproduce")
REF = {"evaluation.dpo.gold_reward_mean": 0.90, "evaluation.dpo.win_rate_gold": 0.80,
       "evaluation.dpo.kl_to_reference": 7.0, "reward_model.val_accuracy": 0.95, "dpo.loss": 0.50,
       "dpo.logps/chosen": -40.0, "data_processing.rows_in": 2550.0, "dpo.precision_bits": 32.0,
       "reference.sft_seconds": 50.0}


def _moved(changes: dict[str, float | None], exact: bool = False):
    now = {k: v for k, v in {**REF, **changes}.items() if v is not None}
    return reproduce.compare(REF, now, exact)


def test_same_machine_class_needs_every_metric_identical():
    assert _moved({}, exact=True) == ([], True)
    rows, ok = _moved({"evaluation.dpo.gold_reward_mean": 0.9000001}, exact=True)
    assert not ok and [r[0] for r in rows] == ["evaluation.dpo.gold_reward_mean"]
    assert _moved({"reference.sft_seconds": 80.0}, exact=True) == ([], True)  # timings are not compared


@pytest.mark.parametrize("changes,ok", [
    ({"evaluation.dpo.gold_reward_mean": 0.925}, True),  # gold ± 0.03
    ({"evaluation.dpo.gold_reward_mean": 0.94}, False),
    ({"evaluation.dpo.win_rate_gold": 0.77}, True),  # win rates ± 0.03
    ({"evaluation.dpo.win_rate_gold": 0.76}, False),
    ({"evaluation.dpo.kl_to_reference": 8.0}, True),  # KL ± 15 % relative
    ({"evaluation.dpo.kl_to_reference": 8.2}, False),
    ({"reward_model.val_accuracy": 0.935}, True),  # accuracies ± 0.02
    ({"reward_model.val_accuracy": 0.925}, False),
    ({"dpo.loss": 0.509}, True),  # losses ± 2 % relative
    ({"dpo.loss": 0.52}, False),
    ({"data_processing.rows_in": 2549.0}, False),  # counts exact
    ({"dpo.precision_bits": 16.0}, False),
    ({"dpo.logps/chosen": -41.0}, True),  # other values ± 5 % relative
    ({"dpo.logps/chosen": -45.0}, False),
    ({"dpo.loss": None}, False),  # a metric gone
    ({"dpo.new_metric": 1.0}, False),  # a metric the reference does not know
])
def test_another_machine_class_uses_the_stated_tolerances(changes, ok):
    rows, passed = _moved(changes)
    assert passed is ok and len(rows) == 1, rows


def test_table_names_the_metric_values_rule_and_verdict():
    rows, _ = _moved({"evaluation.dpo.kl_to_reference": 9.0, "dpo.loss": 0.505})
    text = reproduce.table(rows)
    assert "| evaluation.dpo.kl_to_reference | 7 | 9 | +2 | KL ± 15 % relative | **FAIL** |" in text
    assert "| dpo.loss | 0.5 | 0.505 | +0.005 | losses ± 2 % relative | ok |" in text


def test_reference_file_describes_its_machine_and_holds_no_timing():
    ref = json.loads(reproduce.REFERENCE.read_text())
    assert set(ref["machine"]) == {"cpu_capability", "cpu_bf16", "precision", "torch_threads", "torch"}
    assert ref["machine"]["precision"] == "fp32"
    assert not [k for k in ref["metrics"] if reproduce.TIMING.search(k)]
    for policy in ("reference", "dpo", "rpo", "rpo_online"):
        assert f"evaluation.{policy}.gold_reward_mean" in ref["metrics"]


def test_readme_results_table_is_made_from_the_reference_file():
    """`python scripts/reproduce.py --readme` writes it; a changed reference needs a new table."""
    ref = json.loads(reproduce.REFERENCE.read_text())
    assert reproduce.readme_block((ROOT / "README.md").read_text()) == reproduce.readme_table(ref)


def test_a_changed_result_fails_the_check_with_a_table(processes, tmp_path, capsys):
    """A tiny dpo run: the reference it writes is met exactly by a second run, and a run with
    another β fails, listing what moved."""
    params = ",".join(f"{k}={v}" for k, v in {**TINY_RUN, "dpo.train.steps": 3, "dpo.train.progress": False,
                                               "dpo.device": "cpu"}.items())
    ref = tmp_path / "tiny.json"
    args = ["--pipelines", "dpo", "--reference", str(ref)]
    assert reproduce.main([*args, "--params", params, "--update"]) == 0
    assert reproduce.main([*args, "--params", params]) == 0
    assert "-> PASS" in capsys.readouterr().out
    assert reproduce.main([*args, "--params", params + ",dpo.beta=0.3"]) == 1
    out = capsys.readouterr().out
    assert "same machine class -> every metric identical" in out and "-> FAIL" in out
    assert "| dpo.loss |" in out and "**FAIL**" in out
    assert "| data_processing.rows_in |" not in out  # what did not move is not listed


def test_gpu_check_dry_run_resolves_every_path(processes, tmp_path):
    out = tmp_path / "gpu_check.json"
    done = processes.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = json.loads(out.read_text())["checks"]
    assert len(checks) == 4 and all(ok for _, ok, _ in checks), checks
    assert "**FAIL**" not in done.stdout
