"""Screenshots of the MLflow UI for the README: the runs table, and a chart-view comparison of the
runs (e.g. test UAR by objective), over an avssl store (default: the quick start's ./mlflow.db).

    python scripts/ui_screenshots.py [--store mlflow.db] [--experiment avssl] [--out docs/img]

Starts `mlflow server` on 127.0.0.1 (a free port), drives headless chromium (installed from
Debian when missing), and stops the server by its process id.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.browser import ensure_chromium, mlflow_server, screenshot  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="mlflow.db", help="SQLite MLflow store (default: ./mlflow.db)")
    ap.add_argument("--artifacts", default=None, help="artifact folder (default: mlruns next to the store)")
    ap.add_argument("--experiment", default="avssl")
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args()

    from mlflow.tracking import MlflowClient

    from avssl.tracking import runs_page_url

    store = Path(args.store).resolve()
    if not store.is_file():
        print(f"no MLflow store at {store}; run `avssl quickstart` first", file=sys.stderr)
        return 2
    exp = MlflowClient(f"sqlite:///{store}").get_experiment_by_name(args.experiment)
    if exp is None:
        print(f"no experiment '{args.experiment}' in {store}", file=sys.stderr)
        return 2
    ensure_chromium()
    out = Path(args.out)
    profile = Path(tempfile.mkdtemp(prefix="avssl-chromium-"))
    with mlflow_server(store, Path(args.artifacts).resolve() if args.artifacts else store.parent / "mlruns") as url:
        runs = runs_page_url(url, exp.experiment_id)
        shots = [
            screenshot(runs, out / "mlflow_runs.png", profile, size=(1600, 900)),
            screenshot(runs.replace("?", "/runs?") + "&compareRunsMode=CHART", out / "mlflow_charts.png", profile, size=(1600, 1000)),
        ]
    for s in shots:
        print(f"wrote {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
