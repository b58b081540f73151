"""Reproduction check: run the default pipeline on a fresh copy of the project and compare every
non-timing metric with the committed reference, ``benchmarks/results/default_metrics.json``.

    make reproduce                                   # = python scripts/reproduce.py
    python scripts/reproduce.py --update             # write the reference from this run (a change
                                                     # meant to move results does this, and says why)
    python scripts/reproduce.py --pipelines dpo --params "reference.sft.steps=6" \\
        --reference /tmp/tiny.json [--update]        # any other configuration, its own reference
    python scripts/reproduce.py --readme             # the README's results table from the reference

The run happens in a temporary copy of ``conf/``, ``data/01_raw`` and ``pyproject.toml`` (no caches,
its own ``mlflow.db``), as ``kedro run`` in a subprocess; the metrics are the last value of each
metric of its MLflow run. The rule (README, "What reproduces where"):

* the reference's ``machine`` (CPU capability, native bf16, precision, torch threads and version)
  equals this run's: every metric must be **identical**;
* otherwise each metric must lie within its ``TOLERANCES`` entry (gold and win rates ± 0.03, KL
  ± 15 % relative, accuracies ± 0.02, losses ± 2 % relative, ...).

Prints a table of every metric that moved (and of missing or new ones); exits 1 when one is out of
bounds, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "benchmarks" / "results" / "default_metrics.json"
# metrics that measure time, not results: never compared
TIMING = re.compile(r"seconds|per_second")


@dataclass(frozen=True)
class Tolerance:
    """``|value - reference| <= absolute + relative * |reference|``."""

    what: str
    absolute: float = 0.0
    relative: float = 0.0

    def holds(self, value: float, reference: float) -> bool:
        if math.isnan(value) or math.isnan(reference):
            return math.isnan(value) and math.isnan(reference)
        return abs(value - reference) <= self.absolute + self.relative * abs(reference) + 1e-12


# across CPU classes or precisions: the first pattern that matches a metric's name decides
TOLERANCES: list[tuple[re.Pattern, Tolerance]] = [(re.compile(p), t) for p, t in [
    (r"gold|win_rate", Tolerance("gold and win rates ± 0.03", absolute=0.03)),
    (r"(^|[._/])kl", Tolerance("KL ± 15 % relative", relative=0.15)),
    (r"accura|agreement", Tolerance("accuracies ± 0.02", absolute=0.02)),
    (r"loss", Tolerance("losses ± 2 % relative", relative=0.02)),
    # counts, sizes, cache hits and the precision: a property of the data and the settings
    (r"^data_processing\.|precision_bits|cache_hit|world_size|weight_bytes|sequences$|prompts$"
     r"|samples$|steps$", Tolerance("counts and settings: exact")),
    (r"learning_rate", Tolerance("learning rate: ± 1e-6 relative", relative=1e-6)),
    (r".", Tolerance("other values (log-probs, rewards, margins, norms, lengths) ± 5 % relative "
                     "or ± 0.02", absolute=0.02, relative=0.05)),
]]
IDENTICAL = Tolerance("identical (same machine class)")


def tolerance(name: str) -> Tolerance:
    return next(t for p, t in TOLERANCES if p.search(name))


def machine(tags: dict[str, str]) -> dict[str, str]:
    """What decides the last digits of a run's numbers, from its MLflow tags and this process."""
    import torch

    return {"cpu_capability": tags.get("rpo_pipeline.cpu_capability", "unknown"),
            "cpu_bf16": tags.get("rpo_pipeline.cpu_bf16", "unknown"),
            "precision": tags.get("rpo_pipeline.precision", "unknown"),
            "torch_threads": str(torch.get_num_threads()), "torch": torch.__version__}


def project_copy(work: Path) -> Path:
    """A fresh copy of the project to run in: ``conf/`` (no credentials), ``data/01_raw``, empty
    data layers, ``pyproject.toml``; no caches, its own ``mlflow.db``."""
    shutil.copytree(ROOT / "conf", work / "conf", ignore=shutil.ignore_patterns("credentials*", "local"))
    (work / "conf" / "local").mkdir()
    shutil.copytree(ROOT / "data" / "01_raw", work / "data" / "01_raw")
    for layer in ("02_intermediate", "03_primary", "04_feature", "05_model_input", "06_models",
                  "07_model_output", "08_reporting"):
        (work / "data" / layer).mkdir()
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    (work / "src").mkdir()  # bootstrap_project wants it; the package itself is installed
    return work


def kedro_command(pipelines: list[str], params: str | None, env: str | None = None) -> list[str]:
    kedro = Path(sys.executable).with_name("kedro")
    return [str(kedro) if kedro.exists() else "kedro", "run",
            *([f"--pipelines={','.join(pipelines)}"] if pipelines else []),
            *([f"--env={env}"] if env else []), *([f"--params={params}"] if params else [])]


def run_default(pipelines: list[str], params: str | None, keep: Path | None = None,
                env: str | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """``kedro run`` on a fresh copy of the project; its MLflow metrics (last values) and tags."""
    work = Path(tempfile.mkdtemp(prefix="rpo_reproduce_")) if keep is None else keep
    try:
        project_copy(work)
        cmd = kedro_command(pipelines, params, env)
        print("$ " + " ".join(cmd), f"  (in {work})", flush=True)
        env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}
        subprocess.run(cmd, cwd=work, env=env, check=True)
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
        run = mlflow.search_runs(experiment_names=["rpo_pipeline"], output_format="list")[0]
        if run.info.status != "FINISHED":
            raise SystemExit(f"the run ended {run.info.status}")
        return dict(run.data.metrics), dict(run.data.tags)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def compare(reference: dict[str, float], metrics: dict[str, float], exact: bool
            ) -> tuple[list[tuple[str, float | None, float | None, str, bool]], bool]:
    """Rows ``(metric, reference, now, rule, ok)`` for every non-timing metric that is not
    identical, missing or new; and whether all hold."""
    rows = []
    for name in sorted(set(reference) | set(metrics)):
        if TIMING.search(name):
            continue
        ref, now = reference.get(name), metrics.get(name)
        if ref is None or now is None:
            rows.append((name, ref, now, "missing" if now is None else "new", False))
            continue
        if now == ref:
            continue
        rule = IDENTICAL if exact else tolerance(name)
        rows.append((name, ref, now, rule.what, not exact and rule.holds(now, ref)))
    return rows, all(ok for *_, ok in rows)


def table(rows) -> str:
    def fmt(v):
        return "—" if v is None else f"{v:.6g}"

    lines = ["| metric | reference | this run | Δ | rule | |", "|---|---:|---:|---:|---|---|"]
    for name, ref, now, rule, ok in rows:
        delta = f"{now - ref:+.3g}" if ref is not None and now is not None else ""
        lines.append(f"| {name} | {fmt(ref)} | {fmt(now)} | {delta} | {rule} | "
                     f"{'ok' if ok else '**FAIL**'} |")
    return "\n".join(lines)


README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- default_metrics table: begin -->", "<!-- default_metrics table: end -->"
POLICIES = {"reference": "reference.sft_precision_bits", "dpo": "dpo.precision_bits",
            "rpo": "rpo.precision_bits", "rpo_online": "rpo_online.round_1.precision_bits"}
BITS = {32: "fp32", 16: "bf16"}


def readme_table(reference: dict) -> str:
    """The README's results table, made from the reference file (``--readme`` writes it there;
    a test checks that the two agree)."""
    m, mach = reference["metrics"], reference["machine"]
    lines = [f"Made by `{reference['command']}` on a CPU with `{mach['cpu_capability']}` kernels "
             f"(native bf16: {mach['cpu_bf16']}), {mach['torch_threads']} torch threads, torch "
             f"{mach['torch']}; `benchmarks/results/default_metrics.json`.", "",
             "| policy | precision | gold reward | win rate (gold) | win rate (RM) | KL to ref (nats) "
             "| test-pair acc. | length | distinct-2 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for policy, bits in POLICIES.items():
        name = "reference (π_SFT)" if policy == "reference" else policy
        e = {k.removeprefix(f"evaluation.{policy}."): v for k, v in m.items()
             if k.startswith(f"evaluation.{policy}.")}
        lines.append(f"| {name} | {BITS.get(int(m[bits]), m[bits])} | {e['gold_reward_mean']:.3f} | "
                     f"{e['win_rate_gold']:.3f} | {e['win_rate_rm']:.3f} | {e['kl_to_reference']:.2f} | "
                     f"{e['preference_accuracy']:.3f} | {e['length_mean']:.1f} | {e['distinct_2']:.3f} |")
    return "\n".join(lines)


def readme_block(text: str) -> str:
    """What stands between the README's table markers."""
    return text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    ap.add_argument("--update", action="store_true", help="write the reference from this run")
    ap.add_argument("--pipelines", nargs="*", default=[], help="default: the __default__ pipeline")
    ap.add_argument("--params", default=None, help="as kedro run --params (a.b=v,c=w)")
    ap.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it")
    ap.add_argument("--readme", action="store_true",
                    help="only write the README's results table from the reference file")
    args = ap.parse_args(argv)
    if args.readme:
        text = README.read_text()
        head, rest = text.split(README_BEGIN, 1)
        tail = rest.split(README_END, 1)[1]
        table_ = readme_table(json.loads(args.reference.read_text()))
        README.write_text(f"{head}{README_BEGIN}\n{table_}\n{README_END}{tail}")
        print(f"README table written from {args.reference}")
        return 0

    metrics, tags = run_default(args.pipelines, args.params, args.keep)
    mach = machine(tags)
    kept = {k: v for k, v in sorted(metrics.items()) if not TIMING.search(k)}
    if args.update:
        args.reference.parent.mkdir(parents=True, exist_ok=True)
        args.reference.write_text(json.dumps({
            "command": "kedro run" + (f" --pipelines={','.join(args.pipelines)}" if args.pipelines else "")
                       + (f" --params={args.params}" if args.params else ""),
            "machine": mach, "metrics": kept}, indent=1) + "\n")
        print(f"wrote {len(kept)} metrics to {args.reference} ({mach})")
        return 0
    ref = json.loads(args.reference.read_text())
    exact = ref["machine"] == mach
    rows, ok = compare(ref["metrics"], kept, exact)
    print(f"\nreference: {ref['machine']}\nthis run:  {mach}")
    print("rule: " + ("same machine class -> every metric identical" if exact
                      else "another machine class -> stated tolerances"))
    compared = sum(1 for k in set(ref["metrics"]) | set(kept) if not TIMING.search(k))
    if rows:
        print(table(rows))
    print(f"\n{compared} metrics compared, {compared - len(rows)} identical, "
          f"{sum(1 for *_, o in rows if o)} within tolerance, {sum(1 for *_, o in rows if not o)} "
          f"out of bounds -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
