"""One pipeline at a time per run directory, the others queued behind it.

Two runs in one run directory would race on its outputs; the run directory's lock (`tasks.lock`) refuses the
second at once. A deployment run cannot be told to come back later, so under Prefect the second run waits
instead: a global concurrency limit of one slot, named after the run directory, is taken for the whole run.
The slot, unlike the lock, is held across the hand-offs to the GPU pool, where the lock passes to the GPU
worker's run. The waiting run says which flow run holds the directory.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run


def slot_name(run_dir: str) -> str:
    """The global concurrency limit of a run directory (Prefect names are short: a hash of the path)."""
    return "ecamp-run-dir-" + hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def this_flow_run() -> str:
    """How the lock file names this run: the flow run's name and id (what a user finds in the UI)."""
    return f"flow run '{flow_run.name}' ({flow_run.id})" if flow_run.id else "a local run"


HOLDER_FILE = ".slot_holder"  # the flow run holding the run directory's slot, for the message of one waiting


@contextmanager
def run_dir_slot(run_dir: str, log: Any) -> Iterator[None]:
    """Hold the run directory's slot for the block, waiting (queued) while another run holds it."""
    name, holder = slot_name(run_dir), Path(run_dir) / HOLDER_FILE
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
        busy = client.read_global_concurrency_limit_by_name(name).active_slots > 0
    if busy:
        log.info(
            "run directory %s is in use by %s: this run waits for it to finish", run_dir, holder_of(holder)
        )
    with concurrency(name, occupy=1, strict=True):
        holder.parent.mkdir(parents=True, exist_ok=True)
        holder.write_text(json.dumps({"by": this_flow_run(), "since": time.time()}))
        yield


def holder_of(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(data["since"]))
        return f"{data['by']} since {since}"
    except (OSError, ValueError, KeyError):
        return "another flow run"
