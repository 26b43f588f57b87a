"""Reliability #2: study and image ids are data, never path components.

Hostile ids (`..`, `/`, NUL, 5,000 characters, non-ASCII) go through every stage that names files after
them; every file lands inside the run directory and nothing else in the folder changes.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.filenames import safe_stem
from tests.conftest import REPO_ROOT

HOSTILE = [
    "../../../../../../escape/pwn",
    "a/b",
    "..",
    "nul\x00byte",
    "x" * 5000,
    "études-肺-ü",
]


def test_safe_stem_keeps_plain_ids_and_encodes_the_rest():
    assert safe_stem("s50414267") == "s50414267"
    assert safe_stem("s5_abc-1.0") == "s5_abc-1.0"
    stems = [safe_stem(i) for i in HOSTILE]
    assert len(set(stems)) == len(stems)
    for stem in stems:
        assert "/" not in stem and "\x00" not in stem and ".." not in stem
        assert 0 < len(stem) <= 60 and stem.isascii() and "~" in stem
    assert safe_stem("a/b") == safe_stem("a/b") != safe_stem("a_b")
    assert safe_stem("a_b") == "a_b"  # a plain id cannot equal an encoded one: those contain '~'


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture(scope="module")
def hostile_manifest(small_corpus, tmp_path_factory) -> Path:
    """The small corpus as a Parquet manifest (CSV cannot carry NUL), abnormal studies under hostile ids."""
    with open(small_corpus / "downstream" / "studies.csv") as fh:
        studies = list(csv.DictReader(fh))
    with open(small_corpus / "downstream" / "classes.csv") as fh:
        image_of = {r["study_id"]: r["image_path"] for r in csv.DictReader(fh)}
    abnormal = [s["study_id"] for s in studies if s["findings"]]
    rename = dict(zip(abnormal, HOSTILE, strict=False))
    assert len(rename) == len(HOSTILE)
    rows = []
    for s in studies:
        path = next((small_corpus / "files").rglob(f"s{s['study_id']}.txt"))
        rows.append(
            {
                "study_id": rename.get(s["study_id"], s["study_id"]),
                "image_path": str(small_corpus / image_of[s["study_id"]]),
                "report_text": path.read_text(),
                "split": s["split"],
            }
        )
    folder = tmp_path_factory.mktemp("hostile")
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


def test_hostile_ids_never_leave_the_run_directory(hostile_manifest):
    from tasks import train_gloria
    from tasks.config import load_config
    from tasks.registry import get_stage
    from tasks.runner import run_stage
    from tests.test_gloria import STAGE_CFG, nested

    folder = hostile_manifest.parent
    run_dir = folder / "run" / "deep"
    before = files_under(folder.parent)
    config = load_config(
        str(REPO_ROOT / "configs" / "demo.yaml"),
        [
            "data.source=manifest",
            f"data.manifest={hostile_manifest}",
            "data.views=[]",
            f"run.run_dir={run_dir}",
        ],
    )
    for stage in ("extract_reports", "match_entities"):
        run_stage(get_stage(stage), config, run_dir)
    reports = pq.read_table(run_dir / "extract_reports" / "reports.parquet").column("study_id").to_pylist()
    assert set(HOSTILE) <= set(reports)  # the ids are kept as data, exactly

    config = config.model_copy(
        update={
            "train_gloria": train_gloria.Config(**nested(STAGE_CFG | {"n_pictures": 100, "train.epochs": 1}))
        }
    )
    run_stage(train_gloria.STAGE, config, run_dir)
    pictures = sorted((run_dir / "train_gloria" / "pictures").iterdir())
    assert pictures and all(p.suffix == ".png" and p.parent.name == "pictures" for p in pictures)
    assert any("~" in p.name for p in pictures)  # at least one hostile id got a picture
    maps = pq.read_table(run_dir / "train_gloria" / "attention_maps.parquet").column("study_id").to_pylist()
    assert set(HOSTILE) <= set(maps)
    outside = files_under(folder.parent) - before
    assert all(p.startswith(f"{folder.name}/run") for p in outside), sorted(outside)[:5]
