"""Issue 26 point 8: a known error is one `error:` line on the CLI, its traceback only in the flow run's log.

Each test drives `ecamp` in-process (CliRunner) and reads what the user would see on stderr: the CLI's own
output plus what Prefect's console handler prints (redirected into a buffer, since it holds its own stream).
`one_line_error` asserts exit code 2, exactly one `error:` line at the end, no `Traceback` and no rich panel
(an exception escaping the command, which the real CLI prints as a boxed traceback).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import REPO_ROOT
from tests.test_cli import wait_until

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")
PANEL = ("╭", "╰", "│")  # rich's traceback box


def shown(result, console: io.StringIO) -> str:
    return result.output + console.getvalue()


def assert_no_traceback(result, console: io.StringIO) -> None:
    stderr = shown(result, console)
    assert not isinstance(result.exception, Exception), stderr  # escaped: a rich panel in the real CLI
    assert "Traceback" not in stderr and not any(c in stderr for c in PANEL), stderr


def one_line_error(argv: list[str], console: io.StringIO) -> str:
    """Run `ecamp argv`; the one `error:` line it ends with (asserting the rest of the contract)."""
    result = CliRunner().invoke(app, [str(a) for a in argv])
    assert result.exit_code == 2, shown(result, console)
    assert_no_traceback(result, console)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.output.endswith(errors[0] + "\n"), result.output
    return errors[0]


def stage_argv(stage: str, run_dir: Path, *sets: str, force: bool = False) -> list[str]:
    """`ecamp stage` on the demo config without generating its corpus. extract_reports gets an (empty) MIMIC
    tree unless the test names one, so the error a test provokes is not pre-flight's missing input."""
    argv = ["stage", stage, "-c", DEMO, "--run-dir", str(run_dir), "--set", "data.generate=false"]
    if stage == "extract_reports" and not any(item.startswith("data.root=") for item in sets):
        empty = Path(tempfile.mkdtemp(prefix="ecamp-empty-mimic-"))
        (empty / "files").mkdir()
        argv += ["--set", f"data.root={empty}"]
    for item in sets:
        argv += ["--set", item]
    return argv + (["--force"] if force else [])


# ------------------------------------------------------------------------------------------ before any flow


def test_extends_through_a_symlink_loop_is_one_line(tmp_path, console):
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    (tmp_path / "top.yaml").write_text("extends: a.yaml\n")
    line = one_line_error(["run", "-c", tmp_path / "top.yaml", "--run-dir", tmp_path / "run"], console)
    assert (
        line == f"error: {tmp_path / 'a.yaml'}: cannot resolve the path (Symlink loop from "
        f"'{tmp_path / 'a.yaml'}')"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["file", "override"])
def test_a_deeply_nested_yaml_is_one_line(tmp_path, console, where):
    """Was a RecursionError inside the YAML parser."""
    deep = "[" * 5000 + "]" * 5000
    config = tmp_path / "deep.yaml"
    config.write_text(f"data:\n  views: {deep}\n" if where == "file" else "run:\n  seed: 1\n")
    argv = ["run", "-c", config, "--run-dir", tmp_path / "run"]
    argv += ["--set", f"data.views={deep}"] if where == "override" else []
    line = one_line_error(argv, console)
    source = str(config) if where == "file" else "override 'data.views'"
    assert line == f"error: {source}: nested too deeply to be a pipeline config"


@pytest.mark.parametrize("command", ["stage", "catalog"])
def test_a_lock_that_is_a_folder_is_one_line(tmp_path, console, command):
    run_dir = tmp_path / "run"
    (run_dir / ".lock").mkdir(parents=True)
    argv = (
        stage_argv("extract_reports", run_dir)
        if command == "stage"
        else ["catalog", "rebuild", "--run-dir", run_dir]
    )
    line = one_line_error(argv, console)
    assert line == (
        f"error: {run_dir / '.lock'} is a folder, not the run directory's lock file: move it away and run "
        f"again (nothing in the run directory was changed)"
    )
    assert [p.name for p in run_dir.iterdir()] == [".lock"]


def test_the_lock_refuses_a_folder_inside_a_flow_too():
    """The pipeline flow takes the lock itself (a deployment run has no CLI check before it)."""
    from tasks.lock import RunDirectoryInTheWay, run_lock

    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"ecamp-lock-{os.getpid()}"
    (run_dir / ".lock").mkdir(parents=True, exist_ok=True)
    try:
        with pytest.raises(RunDirectoryInTheWay, match=r"\.lock is a folder"), run_lock(run_dir):
            pass
    finally:
        shutil.rmtree(run_dir)


@pytest.fixture
def no_prefect_api(monkeypatch):
    """No PREFECT_API_URL, even after a test started the session's Prefect server; no server may start."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr("flows.local_server.launch_server", lambda: pytest.fail("started a server"))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


@pytest.mark.parametrize("home", ["a file", "under a file", "read-only"])
def test_a_prefect_home_that_cannot_hold_the_server_database_is_one_line(
    tmp_path, console, no_prefect_api, home
):
    """PREFECT_HOME pointing to a file, or a read-only HOME (PREFECT_HOME defaults to ~/.prefect): the
    temporary server failed with a SQLite traceback."""
    from prefect.settings import PREFECT_HOME, temporary_settings

    afile = tmp_path / "afile"
    afile.write_text("notes")
    if home == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        (tmp_path / "ro").mkdir(mode=0o555)
    target = {"a file": afile, "under a file": afile / ".prefect", "read-only": tmp_path / "ro" / ".prefect"}[
        home
    ]
    why = {"a file": "File exists", "under a file": "Not a directory", "read-only": "Permission denied"}[home]
    with temporary_settings({PREFECT_HOME: target}):
        line = one_line_error(stage_argv("extract_reports", tmp_path / "run"), console)
    assert line == (
        f"error: PREFECT_HOME {target} is not a writable folder ({why}): set PREFECT_HOME to one, or "
        "PREFECT_API_URL to a running Prefect server"
    )
    assert afile.read_text() == "notes"


def test_a_prefect_api_url_on_a_closed_port_is_one_line(tmp_path, console, no_prefect_api, monkeypatch):
    """Was `RuntimeError: Failed to reach API` in a rich traceback panel, exit 1."""
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    line = one_line_error(stage_argv("extract_reports", tmp_path / "run"), console)
    assert line == (
        f"error: PREFECT_API_URL {url} does not answer ([Errno 111] Connection refused): start that server, "
        f"or unset PREFECT_API_URL to let the command start a temporary one"
    )


# ------------------------------------------------------------------------------------------ inside a flow


def extracted(run_dir: Path, corpus: Path) -> dict[str, bytes]:
    """extract_reports run (without Prefect) on `corpus` into `run_dir`; its folder's files and their
    bytes."""
    from tasks.config import load_config
    from tasks.registry import get_stage
    from tasks.runner import run_stage

    config = load_config(DEMO, [f"data.root={corpus}", "data.generate=false"])
    run_stage(get_stage("extract_reports"), config, run_dir)
    return folder_bytes(run_dir / "extract_reports")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_a_known_error_mid_flow_is_one_line_in_the_run_log_too(tmp_path, console, prefect_server):
    """Issue 27 item 2: the stage's known error is an ERROR line in the run's log and the run's state message;
    its traceback is logged at DEBUG only (the server keeps INFO and above)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    manifest = tmp_path / "empty.csv"
    manifest.write_text("study_id,image_path,report_text\n")
    argv = stage_argv(
        "extract_reports", tmp_path / "run", "data.source=manifest", f"data.manifest={manifest}"
    )
    line = one_line_error(argv, console)
    cause = f"{manifest}: no study at all in the input (an empty manifest or MIMIC tree)"
    assert line == f"error: {cause}"
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]

        def logs() -> list:  # the log handler sends in batches: poll until the error line is there
            return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))

        wait_until(lambda: any(cause == log.message for log in logs()), 30, "the run's error line")
        kept = logs()
    assert run.state.is_failed() and run.state.message == f"extract_reports: {cause}"
    assert [log.level for log in kept if log.message == cause] == [
        40,
        40,
    ]  # the task run's and the flow run's
    assert not any("Traceback" in log.message for log in kept), [log.message for log in kept]


def test_a_bug_mid_flow_keeps_its_traceback(tmp_path, console, prefect_server, monkeypatch):
    """Only known errors lose their traceback on the console: a bug must still show where it happened."""

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("flows.pipeline.run_stage", broken)
    result = CliRunner().invoke(app, stage_argv("extract_reports", tmp_path / "run"))
    assert isinstance(result.exception, ZeroDivisionError)
    assert "Traceback" in console.getvalue() and "ZeroDivisionError: a bug" in console.getvalue()


def test_symlink_loops_and_dangling_links_in_the_mimic_tree_are_rejects_not_a_crash(
    tmp_path, console, prefect_server, small_corpus
):
    """They crashed the cache key (`runner.input_files` -> `files.stamp`) before extraction could reject
    them."""
    corpus = tmp_path / "mimic"
    shutil.copytree(small_corpus, corpus, symlinks=True)
    loop = sorted((corpus / "files").rglob("s*.txt"))[0]  # a listed study's report: a link to itself
    loop.unlink()
    loop.symlink_to(loop)
    dangling = sorted((corpus / "files").rglob("*.jpg"))[-1]  # a listed image: a link to nothing
    dangling.unlink()
    dangling.symlink_to(tmp_path / "gone.jpg")
    argv = stage_argv("extract_reports", tmp_path / "run", f"data.root={corpus}")
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, shown(result, console)
    assert_no_traceback(result, console)
    rejects = pq.read_table(tmp_path / "run" / "extract_reports" / "rejects.parquet").to_pylist()
    reasons = {r["source"]: r["reason"] for r in rejects}
    assert reasons[str(loop)].startswith(
        "cannot read report file: symlink loop (Too many levels of symbolic links)"
    )
    assert reasons[str(dangling)].endswith(": file does not exist")


def test_a_success_record_that_is_a_folder_is_refused_before_any_output_is_replaced(
    tmp_path, console, prefect_server, small_corpus
):
    """Was a traceback after the outputs had been swapped, leaving `.tmp-*` and `.previous` behind."""
    run_dir = tmp_path / "run"
    before = extracted(run_dir, small_corpus)
    record = run_dir / "extract_reports" / "_stage.json"
    record.unlink()
    record.mkdir()
    before = {k: v for k, v in before.items() if k != "_stage.json"}
    line = one_line_error(stage_argv("extract_reports", run_dir, f"data.root={small_corpus}"), console)
    assert line == (
        f"error: {record} is a folder, not the stage's success record: move it away and run again (nothing "
        f"in the run directory was changed)"
    )
    assert folder_bytes(run_dir / "extract_reports") == before  # no .tmp-*, no .previous, no .attempt
    assert sorted(p.name for p in (run_dir / "extract_reports").iterdir()) == sorted([*before, "_stage.json"])


def test_swapped_parquet_outputs_are_refused_naming_both_contracts(
    tmp_path, console, prefect_server, small_corpus
):
    """`stage --force` on a stage reading a swapped file failed with a KeyError on a missing column."""
    run_dir = tmp_path / "run"
    extracted(run_dir, small_corpus)
    folder = run_dir / "extract_reports"
    (folder / "reports.parquet").rename(folder / "swap.parquet")
    (folder / "images.parquet").rename(folder / "reports.parquet")
    (folder / "swap.parquet").rename(folder / "images.parquet")
    line = one_line_error(stage_argv("match_entities", run_dir, force=True), console)
    assert line == f"error: {folder / 'reports.parquet'}: table: holds contract 'images', expected 'reports'"


def test_a_full_disk_during_a_parquet_write_is_one_line_and_keeps_the_last_outputs(
    tmp_path, console, prefect_server, small_corpus, monkeypatch
):
    """The Parquet writer pointed at /dev/full (a real ENOSPC) or, where there is none, raising what pyarrow
    raises then, after leaving a partial temp file."""
    run_dir = tmp_path / "run"
    before = extracted(run_dir, small_corpus)
    real = pq.write_table

    def full_disk(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1")
        if Path("/dev/full").exists():
            real(table, "/dev/full", **kwargs)
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr("data_contracts.io.pq.write_table", full_disk)
    line = one_line_error(
        stage_argv("extract_reports", run_dir, f"data.root={small_corpus}", force=True), console
    )
    attempt = run_dir / "extract_reports" / ".attempt"
    assert line == (
        f"error: no space left on device writing {attempt / 'rejects.parquet'}; the partial file was removed "
        f"and any previous version is intact: free space and rerun"
    )
    after = folder_bytes(run_dir / "extract_reports")
    assert {k: v for k, v in after.items() if not k.startswith(".attempt/")} == before
    assert not [p for p in attempt.iterdir() if p.name.startswith(".tmp-")]


def test_a_full_disk_error_is_never_retried():
    from data_contracts.io import ArtifactWriteError
    from flows.retry import is_transient

    assert not is_transient(
        ArtifactWriteError(Path("x.parquet"), OSError(errno.ENOSPC, "No space left on device"))
    )


def test_catalog_rebuild_skips_lineage_fields_of_the_wrong_type_with_a_warning(
    tmp_path, console, prefect_server, small_corpus, caplog
):
    """Was a TypeError / DuckDB conversion traceback from `ecamp catalog rebuild`."""
    from data_contracts.io import METADATA_KEY

    run_dir = tmp_path / "run"
    extracted(run_dir, small_corpus)
    path = run_dir / "extract_reports" / "reports.parquet"
    table = pq.read_table(path)
    lineage = json.loads(table.schema.metadata[METADATA_KEY]) | {"rows": "many"}
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(lineage)}), path)
    with caplog.at_level("WARNING"):
        result = CliRunner().invoke(app, ["catalog", "rebuild", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, shown(result, console)
    assert_no_traceback(result, console)
    assert f"rebuilt {run_dir / 'catalog.duckdb'}: 2 artifacts" in result.output
    assert (
        f"catalog rebuild: skipping {path} ({path}: table: lineage field 'rows' holds 'many' (str), not int)"
        in caplog.text
    )


@pytest.fixture
def seeded_upstream(tmp_path):
    from tests.test_rules_teacher import write_upstream

    write_upstream(tmp_path / "run")
    return tmp_path / "run"


def teacher_argv(run_dir: Path, server) -> list[str]:
    sets = [
        "seed_distill.teacher=openai",
        f"seed_distill.base_url={server.base_url}",
        "seed_distill.model=teacher",
        "seed_distill.n_reports=10",
        "seed_distill.concurrency=1",
        "seed_distill.max_retries=0",
    ]
    return stage_argv("seed_distill", run_dir, *sets)


def test_a_redirecting_teacher_is_one_line(console, prefect_server, seeded_upstream):
    """Was a ~700-line traceback."""
    from tests.fake_openai_server import FakeOpenAIServer

    with FakeOpenAIServer() as local, FakeOpenAIServer() as elsewhere:
        local.redirect_to = elsewhere.base_url
        line = one_line_error(teacher_argv(seeded_upstream, local), console)
        assert line.startswith(
            f"error: HTTP 307 from {local.base_url}: redirect to {elsewhere.base_url}/chat/"
        )
    assert line.endswith(
        "not followed (report text goes only to the configured endpoint, which the data-use "
        "policy checked); configure the final URL instead"
    )
    assert sum(elsewhere.counts.values()) == 0


def test_a_teacher_where_every_request_fails_is_one_line(console, prefect_server, seeded_upstream):
    from tests.fake_openai_server import FakeOpenAIServer

    with FakeOpenAIServer() as server:
        server.faults.extend(["500"] * 3)
        line = one_line_error(teacher_argv(seeded_upstream, server), console)
    assert line.startswith(
        "error: seed_distill: only 0 of 3 teacher requests succeeded (at least 2 are needed); most common "
        "reasons: [('HTTP 500', 3)]. Fix the cause"
    )


@pytest.mark.parametrize(
    "err",
    [
        pytest.param("adapter", id="malformed-adapter-config"),
        pytest.param("empty-pth", id="empty-pth"),
        pytest.param("resume", id="resume-checkpoint-without-fingerprint"),
        pytest.param("image", id="non-image"),
    ],
)
def test_errors_raised_by_a_stage_are_one_line(tmp_path, console, prefect_server, monkeypatch, err):
    """The errors the stages raise for a malformed `adapter_config.json` (finetune_student / bulk_distill load
    the adapter), an empty `.pth`, a pre-training resume checkpoint without its fingerprint
    (`CheckpointError`, a ValueError) and a file that is no image, made by their real causes and raised from
    inside a real flow."""
    import torch

    from models.checkpoints import CheckpointError, read_state_dict
    from models.distill.student import AdapterLoadError, check_adapter_dir
    from models.ecamp.pretrain import read_resume_checkpoint
    from models.engine.resume import RESUME_KEYS
    from models.images import ImageLoadError, load_grayscale

    if err == "adapter":
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("null")
        (adapter / "adapter_model.safetensors").write_bytes(b"")
        with pytest.raises(AdapterLoadError) as caught:
            check_adapter_dir(adapter)
        raised = caught.value
        expected = (
            f"cannot load LoRA adapter from {adapter}: adapter_config.json holds a JSON NoneType, not an "
            f"object"
        )
    elif err == "empty-pth":
        (tmp_path / "init.pth").write_bytes(b"")
        with pytest.raises(CheckpointError) as caught:
            read_state_dict(tmp_path / "init.pth")
        raised = caught.value
        expected = (
            f"{tmp_path / 'init.pth'}: not a readable torch file (truncated or another format: empty file)"
        )
    elif err == "resume":
        payload = {k: {} for k in RESUME_KEYS if k != "fingerprint"}
        torch.save(payload, tmp_path / "checkpoint.pt")
        with pytest.raises(CheckpointError) as caught:
            read_resume_checkpoint(tmp_path / "checkpoint.pt")
        raised = caught.value
        expected = (
            f"{tmp_path / 'checkpoint.pt'}: not a resume checkpoint of ECAMP pre-training (no "
            f"'fingerprint'); delete "
            "it to start ECAMP pre-training over"
        )
    else:
        text = tmp_path / "notes.png"
        text.write_text("not an image")
        with pytest.raises(ImageLoadError) as caught:
            load_grayscale(text)
        raised = caught.value
        expected = str(raised)
    assert str(raised) == expected

    def failing(*args, **kwargs):
        raise raised

    monkeypatch.setattr("flows.pipeline.run_stage", failing)
    assert one_line_error(stage_argv("extract_reports", tmp_path / "run"), console) == f"error: {expected}"


# ------------------------------------------------------------------------------------------ the causes


def official_lists(folder: Path, train: bytes) -> Path:
    """Official classification lists (one class) over two 8x8 PNGs, `train_list.txt` given as bytes."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / name)
    (folder / "train_list.txt").write_bytes(train)
    (folder / "val_list.txt").write_text("a.png 1\n")
    (folder / "test_list.txt").write_text("b.png 0\n")
    return folder


@pytest.mark.parametrize(
    ("train", "line", "problem"),
    [
        ("a.png 1\nb.png 0\n".encode("utf-16"), "", "is UTF-16 text; save it as UTF-8"),
        (
            "a.png 1\nb.png 0\n# café\n".encode("latin-1"),
            ":3",
            "not UTF-8 (byte 0xe9 at offset 21); save it as UTF-8",
        ),
        (
            b"a.png 1\n../../../../../../etc/hostname 0\n",
            ":2",
            "image path '../../../../../../etc/hostname' leads outside the image root {root}",
        ),
        (
            b"a.png 1\n/etc/hostname 0\n",
            ":2",
            "image path '/etc/hostname' leads outside the image root {root}",
        ),
    ],
    ids=["utf-16", "latin-1", "dot-dot", "absolute"],
)
def test_split_lists_in_another_encoding_or_leaving_the_image_root_name_the_file_and_line(
    tmp_path, train, line, problem
):
    from models.evaluate.datasets import DatasetError, read_official_classification

    folder = official_lists(tmp_path / "lists", train)
    with pytest.raises(DatasetError) as caught:
        read_official_classification(folder, ["x"], multilabel=True)
    assert str(caught.value) == f"{folder / 'train_list.txt'}{line}: {problem.format(root=folder)}"


def test_a_split_list_may_reach_its_images_through_a_symlinked_folder_inside_the_root(tmp_path):
    from models.evaluate.datasets import read_official_classification

    folder = official_lists(tmp_path / "lists", b"a.png 1\n")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(folder / "b.png", tmp_path / "elsewhere" / "c.png")
    (folder / "linked").symlink_to(tmp_path / "elsewhere")
    (folder / "train_list.txt").write_text("a.png 1\nlinked/c.png 0\n")
    splits = read_official_classification(folder, ["x"], multilabel=True)
    assert [s.image for s in splits.train] == [folder / "a.png", folder / "linked" / "c.png"]


def test_an_rle_run_outside_its_image_names_the_file_and_line(tmp_path):
    """Was `RLE run at ... is outside a 8x8 image` from the pixel decoder, naming neither file nor line."""
    from PIL import Image

    from models.evaluate.datasets import DatasetError, read_siim

    images = tmp_path / "png"
    images.mkdir()
    for name in ("p1", "n1"):
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(images / f"{name}.png")
    (images / "text.png").write_text("not an image")
    folder = tmp_path / "siim"
    folder.mkdir()
    (folder / "val_list.csv").write_text("ImageId,EncodedPixels\nn1,-1\n")
    (folder / "test_list.csv").write_text("ImageId,EncodedPixels\nn1,-1\n")
    (folder / "train_list.csv").write_text("ImageId,EncodedPixels\nn1,-1\np1,1 2\np1,62 3\n")
    with pytest.raises(DatasetError) as caught:
        read_siim(folder, image_root=images)
    assert str(caught.value) == (
        f"{folder / 'train_list.csv'}:4: EncodedPixels run to pixel 65, outside the 8x8 image "
        f"{images / 'p1.png'}"
    )
    (folder / "train_list.csv").write_text("ImageId,EncodedPixels\ntext,1 2\n")
    with pytest.raises(DatasetError) as caught:
        read_siim(folder, image_root=images)
    assert str(caught.value) == (
        f"{folder / 'train_list.csv'}:2: image {images / 'text.png'}: not an image file (no known image "
        f"format header)"
    )
    (folder / "train_list.csv").write_text("ImageId,EncodedPixels\np1,1 2\np1,0 61\n")
    assert read_siim(folder, image_root=images).train[0].rle == "1 2 | 0 61"  # runs to pixel 64: inside


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"these are not weights", "header too large"),
        (b"", "header too small"),
        ("truncated", "incomplete metadata, file not fully covered"),
    ],
    ids=["text", "empty", "truncated"],
)
def test_a_text_empty_or_truncated_safetensors_is_a_checkpoint_error_naming_the_file(tmp_path, content, why):
    import torch
    from safetensors.torch import save_file

    from models.evaluate.encoders import CheckpointError, export_arch, read_state

    path = tmp_path / "init.safetensors"
    if content == "truncated":
        save_file({"w": torch.zeros(64)}, str(path))
        content = path.read_bytes()[:-40]
    path.write_bytes(content)
    expected = f"{path}: not a readable safetensors file (Error while deserializing header: {why})"
    for read in (export_arch, read_state):
        with pytest.raises(CheckpointError) as caught:
            read(path)
        assert str(caught.value) == expected


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ("[1, 2]", "adapter_config.json holds a JSON list, not an object"),
        (
            '{"r": "eight", "lora_alpha": 16, "target_modules": ["q"], "peft_type": "LORA"}',
            "adapter_config.json: 'r' is 'eight', not a positive integer",
        ),
        (
            '{"r": 8, "lora_alpha": null, "target_modules": ["q"], "peft_type": "LORA"}',
            "adapter_config.json: 'lora_alpha' is None, not a number",
        ),
        (
            '{"r": 8, "lora_alpha": 16, "target_modules": 3, "peft_type": "LORA"}',
            "adapter_config.json: 'target_modules' is 3, not a module name or a list of them",
        ),
        (
            '{"r": 8, "lora_alpha": 16, "target_modules": "q", "peft_type": "IA3"}',
            "adapter_config.json: 'peft_type' is 'IA3', not 'LORA'",
        ),
    ],
    ids=["list", "r", "alpha", "targets", "type"],
)
def test_a_malformed_adapter_config_names_the_adapter_and_the_key(tmp_path, config, problem):
    from models.distill.student import AdapterLoadError, check_adapter_dir

    (tmp_path / "adapter_config.json").write_text(config)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterLoadError) as caught:
        check_adapter_dir(tmp_path)
    assert str(caught.value) == f"cannot load LoRA adapter from {tmp_path}: {problem}"


def test_tampered_image_cache_entries_are_found_and_rebuilt(tmp_path, caplog):
    """A cached .npy of the wrong shape, holding pickled objects, or of 0 bytes was memory-mapped as it
    was."""
    from PIL import Image

    from models.ecamp.data import decode_gray
    from models.ecamp.image_cache import build_image_cache

    sources = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((40, 30), 60 * i, dtype=np.uint8)).save(path)
        sources.append(str(path))
    folder = tmp_path / "cache"
    first = build_image_cache(sources, folder, short_side=16)
    good = {s: np.load(first[s]) for s in sources}
    np.save(first[sources[0]], np.zeros((3, 3), dtype=np.uint8))
    np.save(first[sources[1]], np.array([{"x": 1}], dtype=object), allow_pickle=True)
    Path(first[sources[2]]).write_bytes(b"")
    with caplog.at_level("WARNING"):
        again = build_image_cache(sources, folder, short_side=16)
    assert again == first
    for source in sources:
        assert np.array_equal(np.load(again[source]), good[source])
        assert tuple(decode_gray(again[source]).shape) == (1, 21, 16)
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [
        f"image cache: {first[sources[0]]} holds an array of uint8 and shape (3, 3), not uint8 (21, 16): "
        "decoding its image again",
        f"image cache: {first[sources[1]]} holds an array of object and shape (1,), not uint8 (21, 16): "
        "decoding its image again",
        f"image cache: {first[sources[2]]} is unreadable (EOF: reading magic string, expected 8 bytes got "
        f"0): decoding its image again",
    ]
