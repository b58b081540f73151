"""One command for the GPU paths, on one CUDA device, offline:

    make gpu-check                      # = python scripts/gpu_check.py
    python scripts/gpu_check.py --dry-run   # on any machine: every path resolves, nothing trains

1. The default pipeline with ``--env gpu`` on a fresh copy of the project (bf16 autocast, the 4-bit
   NF4 reward model on bitsandbytes' CUDA kernels, evaluation sampling on the GPU): its wall time,
   its timing metrics, and every other metric against the CPU reference
   (``benchmarks/results/default_metrics.json``) with ``reproduce.py``'s cross-machine tolerances.
2. Ours against TRL ``DPOTrainer`` at its best on the 8 x 512 GPT-2 (``bench_dpo_vs_trl.py
   --device cuda --precision bf16``, the same token ids, on that copy's data): pairs/s and the ratio.

Prints one table and writes ``benchmarks/results/gpu_check.json``. Everything it needs is in the
working tree: the tiny models are built from config, the data is bundled, nothing is downloaded.
``--dry-run`` checks what can be checked without a GPU: the packages and the kernels' classes
import, the ``gpu`` env's parameters validate, the commands it would run are well formed, and
the reference and the benchmark script are there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import (  # noqa: E402  (a sibling script)
    REFERENCE,
    ROOT,
    TIMING,
    compare,
    kedro_command,
    machine,
    project_copy,
    run_default,
    table,
)

BENCH = ROOT / "benchmarks" / "bench_dpo_vs_trl.py"
OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
ENV = "gpu"
BENCH_ARGS = ["--models", "gpt2-8x512", "--device", "cuda", "--precision", "bf16", "--reps", "3"]


def preflight(work: Path) -> list[tuple[str, bool, str]]:
    """``(check, ok, detail)`` for every path the real run takes, without running it."""
    checks: list[tuple[str, bool, str]] = []

    def check(name: str, fn) -> None:
        try:
            checks.append((name, True, str(fn() or "")))
        except Exception as e:  # noqa: BLE001 - each failure is reported, not raised
            checks.append((name, False, f"{type(e).__name__}: {e}"[:300]))

    def packages():
        import accelerate
        import bitsandbytes as bnb
        import peft
        import torch
        import trl

        assert hasattr(bnb.nn, "Linear4bit") and hasattr(trl, "DPOTrainer")
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none in this build'}), "
                f"bitsandbytes {bnb.__version__}, peft {peft.__version__}, accelerate "
                f"{accelerate.__version__}, trl {trl.__version__}")

    def env_params():
        from kedro.framework.session import KedroSession
        from kedro.framework.startup import bootstrap_project

        from rpo_pipeline.params import validate_project_params

        bootstrap_project(work)
        with KedroSession.create(project_path=work, env=ENV) as session:
            params = validate_project_params(session.load_context().config_loader["parameters"],
                                             source=f"conf/base + conf/{ENV}")
        devices = {g: getattr(params, g).device for g in ("reference", "reward_model", "dpo", "rpo",
                                                          "evaluation")}
        assert set(devices.values()) == {"cuda"}, devices
        assert params.reward_model.load_in_4bit and params.reward_model.compute_dtype == "bfloat16"
        return f"devices {sorted(set(devices.values()))}, 4-bit reward model, bf16 compute"

    def commands():
        cmd = kedro_command([], None, ENV)
        assert Path(cmd[0]).exists() or cmd[0] == "kedro", cmd[0]
        help_ = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True,
                               check=True).stdout
        assert all(a in help_ for a in ("--device", "--data", "--precision", "--models")), help_
        return " ".join(cmd[1:]) + f"; {BENCH.name} " + " ".join(BENCH_ARGS)

    def reference():
        ref = json.loads(REFERENCE.read_text())
        return f"{len(ref['metrics'])} metrics, made on {ref['machine']}"

    check("packages and kernels' classes import", packages)
    check(f"--env {ENV}: parameters validate, every stage on cuda", env_params)
    check("commands resolve", commands)
    check(f"CPU reference {REFERENCE.relative_to(ROOT)}", reference)
    return checks


def gpu_run(work: Path) -> dict:
    """Both measurements on this machine's GPU (see the module docstring)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible: run with --dry-run, or on a GPU machine")
    t0 = time.perf_counter()
    metrics, tags = run_default([], None, keep=work, env=ENV)
    wall = time.perf_counter() - t0
    ref = json.loads(REFERENCE.read_text())
    kept = {k: v for k, v in metrics.items() if not TIMING.search(k)}
    rows, ok = compare(ref["metrics"], kept, exact=False)
    bench_out = work / "dpo_vs_trl_gpu"
    subprocess.run([sys.executable, str(BENCH), *BENCH_ARGS, "--data", str(work / "data"),
                    "--out", str(bench_out)], check=True)
    bench = json.loads(bench_out.with_suffix(".json").read_text())["models"]["gpt2-8x512"]
    return {"device": torch.cuda.get_device_name(0), "machine": machine(tags),
            "pipeline_wall_seconds": wall,
            "stage_seconds": {k: v for k, v in sorted(metrics.items()) if TIMING.search(k)},
            "metrics_within_tolerance": ok, "moved": [
                {"metric": n, "reference": r, "gpu": v, "rule": rule, "ok": o}
                for n, r, v, rule, o in rows],
            "dpo_vs_trl": {"ours_pairs_per_second": bench["ours_pairs_per_second"],
                           "trl_best_config": bench["trl_best_config"],
                           "trl_best_pairs_per_second": bench["trl_pairs_per_second"][bench["trl_best_config"]],
                           "ratio_vs_trl_best": bench["ratio_vs_trl_best"], "precision": bench["precision"]}}


def report(result: dict) -> str:
    b = result["dpo_vs_trl"]
    lines = [f"# GPU check: {result['device']}", "",
             f"default pipeline --env {ENV}: {result['pipeline_wall_seconds']:.0f} s; metrics against "
             f"the CPU reference: {'within tolerance' if result['metrics_within_tolerance'] else 'OUT OF BOUNDS'}",
             "", "| stage timing | seconds or rate |", "|---|---:|"]
    lines += [f"| {k} | {v:.3g} |" for k, v in result["stage_seconds"].items()]
    lines += ["", table([(m["metric"], m["reference"], m["gpu"], m["rule"], m["ok"])
                         for m in result["moved"]]), "",
              f"DPO 8 x 512, {b['precision']}: ours {b['ours_pairs_per_second']:.1f} pairs/s, TRL best "
              f"({b['trl_best_config']}) {b['trl_best_pairs_per_second']:.1f} -> "
              f"{b['ratio_vs_trl_best']:.2f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="check that every path resolves; no GPU needed")
    ap.add_argument("--out", type=Path, default=None, help=f"default: {OUT.relative_to(ROOT)} "
                    "(a dry run writes only where this is given)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rpo_gpu_check_") as tmp:
        work = project_copy(Path(tmp) / "project")
        checks = preflight(work)
        print("| check | ok | detail |\n|---|---|---|")
        for name, ok, detail in checks:
            print(f"| {name} | {'ok' if ok else '**FAIL**'} | {detail} |")
        if not all(ok for _, ok, _ in checks):
            return 1
        if args.dry_run:
            if args.out:
                args.out.write_text(json.dumps({"dry_run": True, "checks": checks}, indent=1) + "\n")
            return 0
        import shutil

        shutil.rmtree(work)  # the run starts from a fresh copy
        result = gpu_run(work) | {"checks": checks}
    out = args.out or OUT
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))
    return 0 if result["metrics_within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
