"""Take the README's Prefect UI pictures from a real `full` run (headless Debian chromium).

Run it from the checkout the deployments run from, once `prefect deployment run 'ecamp-pipeline/full' --watch`
has completed against the server at PREFECT_API_URL:

    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/python docs/screenshots.py --run-dir runs/demo

It writes docs/ui-artifacts.png (the Artifacts page), docs/ui-lineage.png (the run's lineage artifact),
docs/ui-manifest.png (pretrain_ecamp's manifest) and docs/ui-run-graph.png (the newest `full` run, whose
graph edges are the data lineage). The pictures show the run directory's path: take them from a readable one.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

HEADLESS = [  # Debian's chromium as root in a container, without GPU, network chatter or first-run pages
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def shoot(url: str, out: Path, width: int, budget_ms: int) -> None:
    """One page once its scripts ran for `budget_ms` of virtual time (the UI fetches after it loads)."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                "chromium",
                *HEADLESS,
                f"--window-size={width},1000",
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}",
                f"--screenshot={out}",
                url,
            ],
            capture_output=True,
            timeout=240,
            check=True,
        )
    print(f"{out}: {url}")


def main() -> None:
    sys.path.insert(0, str(REPO))  # run as a script: `flows` from this checkout
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        DeploymentFilter,
        DeploymentFilterName,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL

    from flows.publish import artifact_key

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="the run's directory")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the pictures go")
    parser.add_argument("--budget-ms", type=int, default=30_000, help="virtual time for the UI's API calls")
    args = parser.parse_args()
    if shutil.which("chromium") is None:
        sys.exit("needs Debian's chromium: apt-get install -y chromium")
    ui = PREFECT_API_URL.value().removesuffix("/api")
    run_dir = args.run_dir.resolve()
    with get_client(sync_client=True) as client:
        latest = {
            stage: client.read_latest_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(run_dir, stage)]))
            )
            for stage in ("pretrain_ecamp", "lineage")
        }
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["full"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
    missing = [stage for stage, found in latest.items() if not found]
    if missing or not runs:
        sys.exit(f"no completed `full` run of {run_dir} on {ui}: run the deployment first")
    pages = {
        "ui-artifacts.png": (f"{ui}/artifacts", 1400),
        "ui-lineage.png": (f"{ui}/artifacts/artifact/{latest['lineage'][0].latest_id}", 1400),
        "ui-manifest.png": (f"{ui}/artifacts/artifact/{latest['pretrain_ecamp'][0].latest_id}", 1400),
        "ui-run-graph.png": (f"{ui}/runs/flow-run/{runs[0].id}", 1600),
    }
    for name, (url, width) in pages.items():
        shoot(url, args.out / name, width, args.budget_ms)


if __name__ == "__main__":
    main()
