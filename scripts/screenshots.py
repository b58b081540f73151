"""Retake the documentation's screenshots (docs/images/*.png) from this project's last runs.

Starts kedro-viz and the MLflow UI on local ports, drives headless Chromium with Playwright, and
writes each picture at about the width the documentation shows it (1000 px; the page with the
pictures hides its table of contents to give them that width). kedro-viz's onboarding tour and its
version banner are switched off before the page loads (its local-storage flags), and hidden if they
still draw; its menu and minimap are hidden and the DAG is zoomed until node names read. MLflow's
assistant panel and side bar are closed. Needs a finished `kedro run` (two runs for the compare
view, e.g. a second one with `--params dpo.beta=0.1,rpo.beta=0.1`), Chromium (`apt-get install
chromium`) and `pip install playwright` (the browser Playwright would download is not needed).

    python scripts/screenshots.py [--chromium /usr/bin/chromium] [--out docs/images]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIEWPORT = {"width": 1000, "height": 760}
DAG_ZOOM = 60  # kedro-viz zoom (%) at which node names read at the page's width
# kedro-viz keeps its UI state in localStorage["KedroViz"]; these keep the tour and banners away
VIZ_STATE = {"showFeatureHints": False, "featureHintStep": 0, "showBanner": {}, "flags": {}}
HIDE_POPUPS = """.feature-hints, .feature-hints__card, .update-reminder-unexpanded, .update-reminder-expanded,
.pipeline-settings-modal__upgrade-reminder, .banner, [class*="onboarding"] { display: none !important; }"""


def _free_port(start: int) -> int:
    """The first port from ``start`` on that nothing listens on."""
    for port in range(start, start + 100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError(f"no free port in {start}..{start + 99}")


@contextmanager
def server(cmd: list[str], url: str, timeout_s: float = 180.0):
    """Start ``cmd`` in the project and wait until ``url`` answers; stop it afterwards."""
    # the UIs shell out to the environment's executables: put them on PATH
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(Path(tempfile.gettempdir()) / f"screenshots-{Path(cmd[0]).name}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{' '.join(cmd)} did not serve {url}") from None
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _node_id(base: str, pipeline: str, name: str) -> str:
    """kedro-viz's id of the dataset or node ``name`` in ``pipeline`` (from its REST API)."""
    with urllib.request.urlopen(f"{base}/api/pipelines/{pipeline}", timeout=60) as r:
        nodes = json.load(r)["nodes"]
    return next(n["id"] for n in nodes if n["name"] == name)


def _open(page, url: str) -> None:
    page.goto(url, wait_until="networkidle")
    page.add_style_tag(content=HIDE_POPUPS)
    page.wait_for_timeout(3000)


def _zoom_level(page) -> int:
    return int(page.get_by_title("Zoom level").inner_text().rstrip("%"))


def _viz(page, base: str, out: Path) -> None:
    page.add_init_script(f"window.localStorage.setItem('KedroViz', {json.dumps(json.dumps(VIZ_STATE))});")
    # the top of data_processing (raw -> intermediate -> primary layers) at a zoom where names read
    _open(page, f"{base}/?pid=data_processing")
    page.get_by_label("Hide menu").click()
    page.get_by_label("Turn minimap off").click()
    for _ in range(10):
        if _zoom_level(page) >= DAG_ZOOM:
            break
        page.get_by_label("Zoom in").click()
        page.wait_for_timeout(600)
    # zooming keeps the centre: drag the DAG down until its first row is at the top
    top = page.evaluate("Math.min(...Array.from(document.querySelectorAll('g.pipeline-node'),"
                        " n => n.getBoundingClientRect().top))")
    page.mouse.move(600, 100)
    page.mouse.down()
    page.mouse.move(600, 100 + 30 - top, steps=15)
    page.mouse.up()
    page.mouse.move(40, 340)  # on the blank part of the tool bar: no tooltip, no layer lit
    page.wait_for_timeout(1000)
    page.screenshot(path=str(out / "kedro_viz.png"))
    # the evaluation stage with a table and a plot previewed in the side panel
    for name, picture in (("evaluation.policy_metrics", "kedro_viz_table_preview.png"),
                          ("evaluation.reward_vs_kl_plot", "kedro_viz_preview.png")):
        _open(page, f"{base}/?pid=evaluation&sid={_node_id(base, 'evaluation', name)}")
        page.get_by_label("Hide menu").click()
        page.mouse.move(VIEWPORT["width"] - 5, VIEWPORT["height"] - 5)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out / picture))


# the compare view's visualisation section, above the run details
COMPARE_CLIP = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": 640}


def _mlflow_chrome_off(page) -> None:
    """Close MLflow 3.17's assistant panel (it takes a third of the page) and fold its side bar."""
    close = page.get_by_label("Close", exact=True)
    if close.count():
        close.first.click()
    page.get_by_label("Toggle sidebar").first.click()
    page.wait_for_timeout(1500)


def _mlflow(page, base: str, out: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ROOT / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name("rpo_pipeline")
    runs = mlflow.search_runs([exp.experiment_id], output_format="list", max_results=2)
    if len(runs) < 2:
        raise SystemExit("the compare view needs two runs: run `kedro run --params dpo.beta=0.1,rpo.beta=0.1` too")
    ids = json.dumps([r.info.run_id for r in runs])
    page.goto(f"{base}/#/compare-runs?runs={ids}&experiments={json.dumps([exp.experiment_id])}",
              wait_until="load")
    page.wait_for_timeout(5000)
    _mlflow_chrome_off(page)
    # the parallel-coordinates plot of DPO's β against its KL and gold reward (three axes: the
    # axis titles overlap with more)
    for label, keys in (("Parameters:", ["dpo.beta"]),
                        ("Metrics:", ["evaluation.dpo.kl_to_reference", "evaluation.dpo.gold_reward_mean"])):
        box = page.get_by_text(label, exact=True).first.bounding_box()
        page.mouse.click(box["x"] + 120, box["y"] + box["height"] + 20)
        for _ in range(6):  # the default choices
            page.keyboard.press("Backspace")
        for key in keys:
            page.keyboard.type(key)
            page.wait_for_timeout(500)
            page.keyboard.press("Enter")
        page.keyboard.press("Escape")
        page.wait_for_timeout(1000)
    page.mouse.click(VIEWPORT["width"] - 20, 400)  # close the choice lists
    page.wait_for_timeout(1000)
    page.screenshot(path=str(out / "mlflow_compare.png"), clip=COMPARE_CLIP)
    page.goto(f"{base}/#/models/rpo_pipeline.dpo_policy/versions/1", wait_until="load")
    page.wait_for_timeout(4000)
    if page.get_by_label("Close", exact=True).count():
        _mlflow_chrome_off(page)
    page.screenshot(path=str(out / "mlflow_registered_model.png"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = ap.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit("pip install playwright (its browser download is not needed: --chromium)") from None
    if not args.chromium:
        raise SystemExit("no Chromium found: apt-get install chromium, or pass --chromium PATH")
    args.out.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    viz_port, ui_port = _free_port(4141), _free_port(5055)  # kedro-viz refuses ports above 49151
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
        with server([str(bindir / "kedro"), "viz", "run", "--no-browser", "--host", "127.0.0.1",
                     "--port", str(viz_port)], f"http://127.0.0.1:{viz_port}") as base:
            _viz(page, base, args.out)
        with server([str(bindir / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{ROOT / 'mlflow.db'}",
                     "--host", "127.0.0.1", "--port", str(ui_port)], f"http://127.0.0.1:{ui_port}") as base:
            _mlflow(page, base, args.out)
        browser.close()
    shutil.copy(ROOT / "data" / "08_reporting" / "overoptimization.png", args.out / "overoptimization.png")
    print(f"wrote {sorted(p.name for p in args.out.glob('*.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
