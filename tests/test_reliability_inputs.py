"""Inputs and what the CLI may write (issue 26, points 4-6): changed images are seen, the demo generator never
deletes a user's edits, and nothing is written outside the run directory or generated that the run will not
read."""

from __future__ import annotations

import hashlib
import json
import os
import time
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image as PILImage
from typer.testing import CliRunner

import flows.cli
from data_contracts.base import Row
from data_contracts.io import read_artifact
from data_contracts.reports import Image
from data_contracts.stamps import STAMPS_FILE, StampTable, stat_stamp
from flows.cli import app
from models.ecamp.image_cache import build_image_cache, source_size
from models.synth.corpus import MARKER, CorpusFolderError, SynthConfig, generate_corpus
from tasks.base import StageConfig
from tasks.config import load_config
from tasks.extract_reports import STAGE as EXTRACT
from tasks.inputs import prepare_inputs
from tasks.record import read_record
from tasks.runner import run_stage
from tasks.stage import Stage

from .conftest import REAL_DATA, REPO_ROOT

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")
EMPTY_RUN_DIR = "error: --run-dir is empty; name a run directory (e.g. runs/default, or . on purpose)\n"


@pytest.fixture
def no_flow(monkeypatch) -> list[dict]:
    """The CLI up to the flow: the flow itself (a Prefect server, the stages) is recorded, not run."""
    calls: list[dict] = []
    monkeypatch.setattr(flows.cli, "_run_flow", lambda flow, **kwargs: calls.append(kwargs) or [])
    return calls


# ------------------------------------------------------------------------------- 6. writes outside the run


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "-c", DEMO, "--until", "extract_reports"],
        ["stage", "extract_reports", "-c", DEMO],
        ["demo", "--until", "extract_reports"],
        ["evaluate", "-c", DEMO],
        ["catalog", "rebuild"],
    ],
)
def test_an_empty_run_dir_option_is_refused_and_nothing_is_written(tmp_path, monkeypatch, no_flow, argv):
    """`--run-dir ""` became Path("."): artifacts, catalog.duckdb and .lock landed in the working
    directory."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*argv, "--run-dir", ""])
    assert result.exit_code == 2, result.output
    assert result.output == EMPTY_RUN_DIR
    assert list(tmp_path.iterdir()) == [] and no_flow == []


def test_a_manifest_run_generates_no_demo_corpus(tmp_path, monkeypatch, no_flow):
    """demo.yaml says data.generate: true; with data.source=manifest data.root is never read, so the CLI (and
    the pipeline's own input step) must not write the 400-study corpus into ./demo_data."""
    monkeypatch.chdir(tmp_path)
    manifest = tmp_path / "m.csv"
    manifest.write_text("study_id,image_path,report_text\n")
    sets = ["--set", "data.source=manifest", "--set", f"data.manifest={manifest}"]
    result = CliRunner().invoke(app, ["run", "-c", DEMO, *sets, "--until", "extract_reports"])
    assert result.exit_code == 0, result.output
    assert len(no_flow) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]
    said: list[str] = []
    config = load_config(DEMO, ["data.source=manifest", f"data.manifest={manifest}"])
    prepare_inputs(config, said.append, ["extract_reports"], regenerate=True)
    assert said == [] and sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]


def test_demo_until_extract_reports_generates_only_the_corpus_it_reads(tmp_path, monkeypatch, no_flow):
    """`ecamp demo --until extract_reports` also built the 3,000-study downstream set that only evaluate
    reads."""
    monkeypatch.chdir(tmp_path)
    sets = ["--set", "data.root=corpus", "--set", "synth.n_studies=4", "--set", "synth.image_size=64"]
    result = CliRunner().invoke(app, ["demo", *sets, "--until", "extract_reports"])
    assert result.exit_code == 0, result.output
    assert "generating the demo corpus at corpus" in result.output
    assert "downstream" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no demo_data/downstream
    assert no_flow[0]["until"] == "extract_reports"


# ------------------------------------------------------------------------------- 5. the generator's deletes


def test_regenerating_the_demo_corpus_keeps_a_users_edits_and_folders(tmp_path, monkeypatch, no_flow):
    """`ecamp demo` with another synth config replaced a generated corpus wholesale: a report the user had
    edited and a folder they had added were deleted. Both are now a refusal, and nothing is touched."""
    monkeypatch.chdir(tmp_path)
    base = ["demo", "--until", "extract_reports", "--set", "data.root=corpus", "--set", "synth.image_size=64"]
    assert CliRunner().invoke(app, [*base, "--set", "synth.n_studies=3"]).exit_code == 0
    corpus = tmp_path / "corpus"
    report = sorted((corpus / "files").rglob("s*.txt"))[0]
    rel = report.relative_to(corpus).as_posix()
    report.write_text(report.read_text() + "\nADDENDUM: my correction.\n")
    (corpus / "my_labels").mkdir()

    result = CliRunner().invoke(app, [*base, "--set", "synth.n_studies=4"])
    assert result.exit_code == 2, result.output
    assert result.output == (
        "error: corpus holds a generated corpus plus files the generator did not write (my_labels/): "
        "refusing to replace it. Move those files away or choose another folder.\n"
    )
    (corpus / "my_labels").rmdir()
    result = CliRunner().invoke(app, [*base, "--set", "synth.n_studies=4"])
    assert result.exit_code == 2, result.output
    assert result.output == (
        f"error: corpus holds a generated corpus with files edited since it was written ({rel}): "
        "refusing to replace it. Move the corpus away or choose another folder.\n"
    )
    assert report.read_text().endswith("ADDENDUM: my correction.\n")
    assert len(list((corpus / "files").rglob("s*.txt"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no partial or moved-aside folder
    assert len(no_flow) == 1  # only the first, successful demo reached the flow


def test_an_unedited_corpus_is_still_replaced_and_an_old_marker_is_refused(tmp_path):
    """The refusal is about the user's files only: the generator's own corpus, even with files deleted,
    is replaced; a marker without hashes (an older generator's) cannot show edits and is refused."""
    small = SynthConfig(n_studies=2, image_size=64)
    corpus = tmp_path / "corpus"
    generate_corpus(small, corpus)
    marker = json.loads((corpus / MARKER).read_text())
    assert {"files", "downstream", "downstream/masks"} <= set(marker["folders"])
    assert (
        marker["files"]["summary.json"] == hashlib.sha256((corpus / "summary.json").read_bytes()).hexdigest()
    )
    (corpus / "summary.json").unlink()
    assert generate_corpus(small.model_copy(update={"n_studies": 3}), corpus, overwrite=True).n_studies == 3

    marker = json.loads((corpus / MARKER).read_text())
    (corpus / MARKER).write_text(json.dumps({**marker, "files": sorted(marker["files"])}))
    with pytest.raises(CorpusFolderError) as err:
        generate_corpus(small, corpus, overwrite=True)
    assert str(err.value) == (
        f"{corpus} was generated by an older corpus generator whose {MARKER} has no file hashes, so edits to "
        "it cannot be told apart: refusing to replace it. Move it away or delete it yourself."
    )
    assert len(list((corpus / "files").rglob("s*.txt"))) == 3


# ------------------------------------------------------------------------------- 4. changed images are seen


class ImageCount(Row):
    contract: ClassVar[str] = "test_image_count"
    sizes: str


class ReaderConfig(StageConfig):
    pass


def _count_images(ctx, cfg) -> None:
    images = ctx.read("extract_reports/images").to_pylist()
    ctx.write("count", [{"sizes": ";".join(f"{r['width']}x{r['height']}" for r in images)}])


READER = Stage(
    name="reader",
    version="1",
    config=ReaderConfig,
    run=_count_images,
    summary="a stage reading the images",
    reads=("extract_reports/images",),
    writes={"count": ImageCount},
)


def _radiograph(path: Path, width: int, height: int, seed: int) -> None:
    """A real radiograph, resized, with a seeded patch of noise: each seed is other content."""
    pixels = np.asarray(
        PILImage.open(REAL_DATA / "images" / "00000001_000.png").convert("L").resize((width, height))
    )
    noise = np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)
    pixels = pixels.copy()
    pixels[:16, :16] = noise
    PILImage.fromarray(pixels).save(path, quality=90)


def _manifest_config(tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    rows = ["study_id,image_path,report_text"]
    for i in range(3):
        _radiograph(images / f"{i}.jpg", 256, 256, seed=i)
        rows.append(f's{i},images/{i}.jpg,"FINDINGS: Lungs are clear. IMPRESSION: No acute process {i}."')
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    config = load_config(
        None,
        [
            "data.source=manifest",
            f"data.manifest={tmp_path / 'manifest.csv'}",
            "data.check_images=true",
            "extract_reports.image_workers=1",
        ],
    )
    config = types.SimpleNamespace(**{n: getattr(config, n) for n in ("run", "data", "extract_reports")})
    config.reader = ReaderConfig()
    return config, sorted(images.iterdir())


def _run(config, run_dir: Path) -> dict[str, str]:
    return {s.name: run_stage(s, config, run_dir).status for s in (EXTRACT, READER)}


def test_images_replaced_in_place_rerun_the_stages_that_read_them(tmp_path):
    """Issue 26 #4: with a manifest, images overwritten by others (another size, other content) left
    extract_reports cached and `images` at the old 256x256: only the manifest's own stamp was
    fingerprinted."""
    config, images = _manifest_config(tmp_path)
    run_dir = tmp_path / "run"
    assert _run(config, run_dir) == {"extract_reports": "ran", "reader": "ran"}
    assert _run(config, run_dir) == {"extract_reports": "cached", "reader": "cached"}
    table = read_artifact(run_dir / "extract_reports" / "images.parquet", Image)
    assert table.column("stamp").to_pylist() == [stat_stamp(p) for p in images]  # first seen: a stat only
    inputs = read_record(run_dir, "extract_reports").parts["inputs"]
    assert list(inputs) == [
        (tmp_path / "manifest.csv").as_uri(),
        (tmp_path / "manifest.csv").as_uri() + "#image_path",
    ]

    for i, path in enumerate(images):  # every image replaced: another size, other content
        _radiograph(path, 200, 320, seed=10 + i)
    assert _run(config, run_dir) == {"extract_reports": "ran", "reader": "ran"}
    table = read_artifact(run_dir / "extract_reports" / "images.parquet", Image).to_pylist()
    assert [(r["width"], r["height"]) for r in table] == [(200, 320)] * 3
    assert [r["stamp"] for r in table] == [
        f"sha256:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in images
    ]

    _radiograph(images[1], 200, 320, seed=99)  # the same size, other content: still seen
    assert _run(config, run_dir) == {"extract_reports": "ran", "reader": "ran"}

    later = time.time() + 60  # the same bytes written again (a re-copy, a touch): nothing reruns
    for path in images:
        path.write_bytes(path.read_bytes())
        os.utime(path, (later, later))
    assert _run(config, run_dir) == {"extract_reports": "cached", "reader": "cached"}


def test_a_replaced_image_in_a_mimic_tree_carries_its_new_stamp(tmp_path):
    """The MIMIC tree's images take their stamps from the same table as the fingerprint (the paths agree)."""
    corpus = tmp_path / "mimic"
    generate_corpus(SynthConfig(n_studies=3, image_size=64), corpus)
    config = load_config(None, [f"data.root={corpus}", "extract_reports.image_workers=1"])
    run_dir = tmp_path / "run"
    assert run_stage(EXTRACT, config, run_dir).status == "ran"
    first = read_artifact(run_dir / "extract_reports" / "images.parquet", Image).to_pylist()
    target = Path(first[0]["path"])
    _radiograph(target, 96, 80, seed=5)
    assert run_stage(EXTRACT, config, run_dir).status == "ran"
    second = {
        r["path"]: r for r in read_artifact(run_dir / "extract_reports" / "images.parquet", Image).to_pylist()
    }
    assert second[str(target)]["stamp"] == f"sha256:{hashlib.sha256(target.read_bytes()).hexdigest()}"
    assert (second[str(target)]["width"], second[str(target)]["height"]) == (96, 80)
    assert all(second[r["path"]]["stamp"] == r["stamp"] for r in first[1:])


def test_the_image_cache_decodes_a_replaced_image_again_and_drops_its_old_copy(tmp_path):
    """The pre-training cache was keyed by path only: a replaced image kept training on its old pixels."""
    source = tmp_path / "a.jpg"
    _radiograph(source, 256, 256, seed=1)
    folder = tmp_path / "cache"
    old = build_image_cache([str(source)], folder, 64, stamps={str(source): "sha256:old"})[str(source)]
    assert source_size(old) == (256, 256)
    _radiograph(source, 200, 320, seed=2)
    again = build_image_cache([str(source)], folder, 64, stamps={str(source): "sha256:old"})[str(source)]
    assert again == old  # the same stamp: served from the cache, no read
    new = build_image_cache([str(source)], folder, 64, stamps={str(source): "sha256:new"})[str(source)]
    assert source_size(new) == (320, 200) and np.load(new).shape == (102, 64)
    assert sorted(p.name for p in folder.iterdir()) == [Path(new).name]  # the old content's copy is gone


def test_a_broken_stamp_table_counts_every_file_as_first_seen(tmp_path):
    """A damaged `_input_stamps.parquet` is a warning, never a crash or a stale stamp: every file is first
    seen again (its stat), and the table is written anew."""
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(f"content {i}")
    table_path = tmp_path / STAMPS_FILE
    table_path.write_bytes(b"not parquet at all")
    warnings: list[str] = []
    table = StampTable(table_path, warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith(f"{table_path}: unreadable (")
    assert warnings[0].endswith("): every input file counts as first seen")
    assert table.stamps([str(f) for f in files]) == [stat_stamp(f) for f in files]
    table.save()
    files[0].write_text("other content")
    again = StampTable(table_path, warnings.append)
    assert again.stamps([str(f) for f in files] + [str(tmp_path / "gone.txt")]) == [
        f"sha256:{hashlib.sha256(b'other content').hexdigest()}",
        stat_stamp(files[1]),
        stat_stamp(files[2]),
        "absent",
    ]
    assert len(warnings) == 1
