"""A whole Kedro env end to end at 1 and at N processes: time and peak memory of each stage.

    python benchmarks/hh_scale.py                      # --env hh_rlhf --processes 1 2

For each process count the script clones HEAD into a fresh folder beside this checkout (so that
``../shared`` resolves as it does here, and no cache of an earlier run can hit), and runs
``kedro run --env=<env>`` (every pipeline) there with every stage's ``num_processes`` set to N:
``reference.sft``, ``reference.logprobs``, ``reward_model.train``, ``reward_model.score``,
``dpo.train``, ``rpo.train`` and ``evaluation``.

* **Time** per stage: the sum of its nodes' wall times, from Kedro's "Running node" / "Completed
  node" log records (a plain logging config with timestamps is passed through
  ``KEDRO_LOGGING_CONFIG``). A node belongs to the first stage in run order whose pipeline holds it.
* **Memory**: the Kedro process and all its descendants (the workers) are sampled every 0.5 s with
  psutil. ``pss`` sums proportional set sizes, so libraries shared by the workers count once; ``rss``
  sums resident sizes (an upper bound). The peak of each stage is the largest sample taken while one
  of its nodes ran.
* **Results**: the run's final MLflow metrics (reward model test accuracy, policy eval accuracies,
  evaluation metrics, world sizes).

The runs take many minutes each and are run one after the other, not alternated: read the speed-up
as a single measurement on the machine named in the output. Writes
``benchmarks/results/hh_scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["data_processing", "reference", "reward_model", "dpo", "rpo", "evaluation"]
PROCESS_KEYS = ["reference.sft", "reference.logprobs", "reward_model.train", "reward_model.score",
                "dpo.train", "rpo.train", "evaluation"]
REPORTED = ["reward_model.test_accuracy", "reward_model.val_accuracy",
            "dpo.eval_rewards/accuracies", "rpo.eval_rewards/accuracies",
            "reference.sft_sequences_per_second", "reference.cache_sequences_per_second",
            "reward_model.pairs_per_second", "reward_model.scores_per_second",
            "dpo.pairs_per_second", "rpo.pairs_per_second",
            "evaluation.reference.gold_reward_mean", "evaluation.dpo.gold_reward_mean",
            "evaluation.rpo.gold_reward_mean", "evaluation.dpo.kl_to_reference",
            "evaluation.rpo.kl_to_reference", "dpo.world_size", "rpo.world_size",
            "reward_model.world_size"]
LOGGING = """\
version: 1
disable_existing_loggers: false
formatters:
  plain: {format: "%(created).3f|%(name)s|%(message)s"}
handlers:
  file: {class: logging.FileHandler, formatter: plain, filename: LOGFILE}
root: {handlers: [file], level: INFO}
"""


def stage_of_nodes() -> dict[str, str]:
    """Node name -> the first stage (in run order) whose pipeline holds it."""
    from rpo_pipeline.pipeline_registry import register_pipelines

    pipelines, owner = register_pipelines(), {}
    for stage in STAGES:
        for node in pipelines[stage].nodes:
            owner.setdefault(node.name, stage)
    return owner


class TreeSampler(threading.Thread):
    """Samples (time, pss, rss, processes) of a process and its descendants until stopped."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.every, self.samples = psutil.Process(pid), every, []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pss = rss = n = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    info = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                pss, rss, n = pss + info.pss, rss + info.rss, n + 1
            self.samples.append((time.time(), pss, rss, n))
            self.stop.wait(self.every)


def node_intervals(logfile: Path) -> list[tuple[str, float, float]]:
    """(node, start, end) from the "Running node" / "Completed node" records.

    Kedro logs "Running node" with the node's short name and "Completed node" with its
    namespaced name, so the two are paired by order: the SequentialRunner runs one node
    at a time, and a node completes before the next one starts.
    """
    start, out = None, []
    for line in logfile.read_text().splitlines():
        parts = line.split("|", 2)
        if len(parts) < 3:
            continue
        t, msg = float(parts[0]), parts[2]
        if msg.startswith("Running node: "):
            start = t
        elif msg.startswith("Completed node: ") and start is not None:
            out.append((msg[len("Completed node: "):].strip(), start, t))
            start = None
    return out


def final_metrics(db: Path) -> dict[str, float]:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    run = mlflow.search_runs(experiment_names=["rpo_pipeline"], output_format="list",
                             order_by=["start_time DESC"])[0]
    return {"run_status": run.info.status, **dict(run.data.metrics)}


def run_env(env: str, n: int, owner: dict[str, str], pipelines: str | None = None) -> dict:
    # the clone sits beside this checkout, so that ../shared resolves the same
    project = Path(tempfile.mkdtemp(prefix=f"hh-scale-{n}-", dir=ROOT.parent))
    work = Path(tempfile.mkdtemp(prefix="hh-scale-logs-"))
    try:
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(project)], check=True)
        logfile = work / "kedro.log"
        (work / "logging.yml").write_text(LOGGING.replace("LOGFILE", str(logfile)))
        env_vars = os.environ | {"KEDRO_LOGGING_CONFIG": str(work / "logging.yml"),
                                 "KEDRO_DISABLE_TELEMETRY": "1",
                                 "PYTHONPATH": str(project / "src")}
        params = ",".join(f"{k}.num_processes={n}" for k in PROCESS_KEYS)
        cmd = [sys.executable, "-m", "kedro", "run", f"--env={env}", "--params", params,
               *([f"--pipelines={pipelines}"] if pipelines else [])]
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=project, env=env_vars, stdout=subprocess.DEVNULL,
                                stderr=open(work / "stderr.txt", "w"))
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.stop.set()
        sampler.join()
        wall = time.time() - t0
        if rc != 0:
            raise SystemExit(f"kedro run with {n} process(es) failed (rc {rc}):\n"
                             + (work / "stderr.txt").read_text()[-4000:])
        stages = {s: {"seconds": 0.0, "peak_pss_mb": 0.0, "peak_rss_mb": 0.0, "nodes": 0}
                  for s in STAGES}
        intervals = node_intervals(logfile)
        for name, start, end in intervals:
            st = stages[owner[name]]
            st["seconds"] += end - start
            st["nodes"] += 1
            for t, pss, rss, _ in sampler.samples:
                if start <= t <= end:
                    st["peak_pss_mb"] = max(st["peak_pss_mb"], pss / 2**20)
                    st["peak_rss_mb"] = max(st["peak_rss_mb"], rss / 2**20)
        metrics = final_metrics(project / "mlflow.db")
        return {"processes": n, "wall_seconds": wall, "stages": stages,
                "peak_pss_mb": max(s[1] for s in sampler.samples) / 2**20,
                "max_processes_seen": max(s[3] for s in sampler.samples),
                "metrics": {k: metrics.get(k) for k in REPORTED},
                "nodes": [(name, round(a - t0, 2), round(b - t0, 2)) for name, a, b in intervals],
                "all_metrics": metrics}
    finally:
        shutil.rmtree(project, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def markdown(result: dict) -> str:
    runs = result["runs"]
    base = runs[0]
    head = " | ".join(f"{r['processes']} proc: s | peak PSS MB" for r in runs)
    lines = [f"# `kedro run --env={result['env']}` at {', '.join(str(r['processes']) for r in runs)}"
             f" process(es)", "",
             f"Machine: {result['machine']}. Commit {result['commit'][:10]}. Measured, one run each "
             "(not alternated).", "",
             f"| stage | {head} | speed-up | efficiency |",
             "|---|" + "---|---|" * len(runs) + "---|---|"]
    for s in STAGES:
        if not any(r["stages"][s]["nodes"] for r in runs):
            continue
        cells = " | ".join(f"{r['stages'][s]['seconds']:.1f} | {r['stages'][s]['peak_pss_mb']:.0f}"
                           for r in runs)
        t1, tn = base["stages"][s]["seconds"], runs[-1]["stages"][s]["seconds"]
        speed = t1 / tn if tn else float("nan")
        lines.append(f"| {s} | {cells} | {speed:.2f}x | {speed / runs[-1]['processes']:.0%} |")
    cells = " | ".join(f"{r['wall_seconds']:.1f} | {r['peak_pss_mb']:.0f}" for r in runs)
    speed = base["wall_seconds"] / runs[-1]["wall_seconds"]
    lines += [f"| **whole run** | {cells} | {speed:.2f}x | {speed / runs[-1]['processes']:.0%} |",
              "", "| metric | " + " | ".join(f"{r['processes']} proc" for r in runs) + " |",
              "|---|" + "---|" * len(runs)]
    for k in REPORTED:
        vals = [r["metrics"][k] for r in runs]
        lines.append(f"| `{k}` | " + " | ".join("–" if v is None else f"{v:.4g}" for v in vals)
                     + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="hh_rlhf")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pipelines", help="default: every pipeline (a smoke test may pass one)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hh_scale"))
    args = ap.parse_args()
    owner = stage_of_nodes()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    import torch

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}")
    result = {"env": args.env, "pipelines": args.pipelines or "all", "commit": commit,
              "machine": machine, "runs": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in args.processes:
        print(f"kedro run --env={args.env} with {n} process(es) ...", flush=True)
        result["runs"].append(run_env(args.env, n, owner, args.pipelines))
        print(f"  {result['runs'][-1]['wall_seconds']:.1f} s", flush=True)
        # written after every run: a long benchmark cut off later keeps what it measured
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
