"""Reward-KL frontiers: one ``kedro run`` per β, each point its own MLflow run under one parent.

    python scripts/sweep.py --betas 0.02 0.05 0.1 0.2 0.5            # every policy, val split
    python scripts/sweep.py --betas 0.1 0.5 --methods dpo rpo --env gpu --params dpo.train.steps=40

Every point runs ``kedro run --pipelines=evaluation`` with ``<method>.beta=β`` for each method of
``--methods`` (all three are trained and evaluated in that run; SFT, the reference log-probs and the
reward model come from their caches after the first point) and ``evaluation.split`` = ``--split``
(``val`` by default: sweeps choose, the test split only reports). The script then

* tags the point's MLflow run with ``mlflow.parentRunId`` (a parent run named ``sweep ...`` in the
  experiment ``rpo_pipeline``), ``sweep.beta`` and ``sweep.methods``, so the MLflow UI nests the
  points and the compare view charts them;
* writes ``<out>.csv`` (method, beta, kl, gold, win_rate_gold, rm, run_id), ``<out>_matched.csv``
  (each method's gold reward interpolated at KLs all methods reach) and ``<out>.png``, and logs
  them to the parent run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from rpo_pipeline.params import POLICY_METHODS as METHODS

EXPERIMENT = "rpo_pipeline"


def _client(project: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.MlflowClient()


def _latest_run(client, experiment_id: str, after_ms: int):
    runs = client.search_runs([experiment_id], order_by=["attribute.start_time DESC"], max_results=5)
    runs = [r for r in runs if r.info.start_time >= after_ms and "sweep.parent" not in r.data.tags]
    if not runs:
        raise RuntimeError("the kedro run logged no MLflow run")
    return runs[0]


def run_point(project: Path, beta: float, methods: list[str], split: str, extra: list[str],
              env: str | None) -> int:
    """``kedro run`` for one β; its exit code."""
    params = [f"{m}.beta={beta}" for m in methods] + [f"evaluation.split={split}", *extra]
    cmd = [sys.executable, "-m", "kedro", "run", "--pipelines=evaluation",
           f"--params={','.join(params)}", *([f"--env={env}"] if env else [])]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=project, env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"}
                          ).returncode


def sweep(project: Path, betas: list[float], methods: list[str], split: str = "val",
          extra: list[str] | None = None, env: str | None = None,
          out: Path = Path("benchmarks/results/reward_vs_kl")) -> pd.DataFrame:
    """Run the grid; the frontier points (one row per method and β, plus the reference)."""
    extra = extra or []
    client = _client(project)
    exp = client.get_experiment_by_name(EXPERIMENT) or client.get_experiment(
        client.create_experiment(EXPERIMENT))
    parent = client.create_run(exp.experiment_id, run_name=f"sweep {time.strftime('%Y-%m-%d %H:%M')}",
                               tags={"sweep.parent": "1", "sweep.methods": ",".join(methods),
                                     "sweep.split": split})
    pid = parent.info.run_id
    client.log_param(pid, "betas", ",".join(f"{b:g}" for b in betas))
    client.log_param(pid, "params", ",".join(extra) or "-")
    rows, status = [], "FINISHED"
    try:
        for beta in betas:
            t0 = int(time.time() * 1000)
            if run_point(project, beta, methods, split, extra, env) != 0:
                raise RuntimeError(f"kedro run failed at beta={beta}")
            run = _latest_run(client, exp.experiment_id, t0)
            rid, m = run.info.run_id, run.data.metrics
            for tag, value in {"mlflow.parentRunId": pid, "sweep.beta": f"{beta:g}",
                               "sweep.methods": ",".join(methods)}.items():
                client.set_tag(rid, tag, value)
            client.update_run(rid, name=f"beta={beta:g}")
            for method in ("reference", *methods):
                if method == "reference" and rows and rows[0]["method"] == "reference":
                    continue  # π_SFT is the same at every β
                key = f"evaluation.{method}."
                rows.append({"method": method, "beta": 0.0 if method == "reference" else beta,
                             "kl": m[key + "kl_to_reference"], "gold": m.get(key + "gold_reward_mean"),
                             "win_rate_gold": m.get(key + "win_rate_gold"),
                             "rm": m[key + "rm_score_mean"], "split": split, "run_id": rid})
    except BaseException:
        status = "FAILED"
        raise
    finally:
        points = pd.DataFrame(rows)
        if len(points):
            for path in write_results(points, project / out if not out.is_absolute() else out):
                client.log_artifact(pid, str(path), "sweep")
        client.set_terminated(pid, status)
    return points


def write_results(points: pd.DataFrame, out: Path) -> list[Path]:
    """``<out>.csv`` (the points), ``<out>_matched.csv`` (``reporting.matched_kl``) and
    ``<out>.png`` (``reporting.frontier_plot``); their paths."""
    from rpo_pipeline.reporting import frontier_plot, matched_kl

    out.parent.mkdir(parents=True, exist_ok=True)
    methods = points[points["method"] != "reference"]
    ref = points.loc[points["method"] == "reference", "gold"]
    split = points["split"].iloc[0]
    paths = [out.with_suffix(".csv"), out.parent / f"{out.name}_matched.csv", out.with_suffix(".png")]
    points.to_csv(paths[0], index=False)
    matched = matched_kl(methods)
    matched.to_csv(paths[1], index=False)
    frontier_plot(methods, None if ref.empty else float(ref.iloc[0]),
                  title=f"gold reward vs KL ({split} split)").savefig(paths[2], dpi=110)
    print(points.to_string(index=False))
    print("gold at matched KL:\n" + matched.to_string(index=False))
    return paths


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--betas", type=float, nargs="+")
    ap.add_argument("--replot", type=Path, default=None,
                    help="only redraw <out>_matched.csv and <out>.png from this points CSV")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--split", default="val", choices=("train", "val", "test"))
    ap.add_argument("--params", default="", help="more kedro --params, comma-separated a.b=v")
    ap.add_argument("--env", default=None)
    ap.add_argument("--project", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/reward_vs_kl"),
                    help="path stem of the CSV / PNG (relative to the project)")
    a = ap.parse_args(argv)
    if a.replot is not None:
        points = pd.read_csv(a.replot)
        write_results(points, a.out if a.out.is_absolute() else a.project / a.out)
        return points
    if not a.betas:
        ap.error("--betas is required (unless --replot)")
    extra = [p for p in a.params.split(",") if p]
    return sweep(a.project, a.betas, a.methods, a.split, extra, a.env, a.out)


if __name__ == "__main__":
    main()
