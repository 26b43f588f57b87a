"""bulk_distill: teacher rows kept, student elsewhere, QC retries within budget, shard resume after a crash;
and the finetune_student stage end to end on a tiny base feeding bulk_distill's transformers backend."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow.parquet as pq
import pydantic
import pytest
import torch

import tasks.bulk_distill as bulk
import tasks.finetune_student as ft
from models.distill import parse, rules_teacher
from models.distill.rules_teacher import mentions_by_study
from models.text.entities import EntityMatcher, build_lexicon
from tasks.config import load_config
from tasks.seed_distill import Config as SeedConfig
from tests.context import make_test_context, run_direct, seed_artifact
from tests.fake_openai_server import report_from_prompt
from tests.real_data import REPO_ROOT

torch.set_num_threads(1)

ENTITIES = ["effusion", "pneumothorax", "consolidation", "edema", "cardiomegaly", "pneumonia"]
TEXTS = {
    "s00": "Small left pleural effusion. No pneumothorax.",
    "s01": "No focal consolidation. Mild cardiomegaly.",
    "s02": "Possible right lower lobe pneumonia. No effusion.",
    "s03": "Moderate pulmonary edema. No pneumothorax.",
    "s04": "Lungs are clear. Heart size is normal.",  # no entity: nothing to distil
    "s05": "Large right pneumothorax. No effusion.",
    "s06": "No edema. No consolidation.",
    "s07": "Mild pulmonary edema. Small effusion.",
    "s08": "No pneumonia. Stable cardiomegaly.",
    "s09": "Trace effusion. No pneumothorax. No edema.",
}
SEEDS = ("s00", "s01", "s02")  # the teacher already distilled these


def write_upstream(run_dir, teacher_text=None, texts=TEXTS, seeds=SEEDS, entities=ENTITIES):
    """reports, entity_mentions and seed_distillations as stages 1-3 would write them; the teacher answered
    `seeds` (`teacher_text(study_id)`, else the rules teacher's answer tagged TEACHER)."""
    reports = [
        {
            "study_id": s,
            "subject_id": "p1",
            "split": "train",
            "findings": t,
            "impression": "",
            "text": t,
            "source_path": f"{s}.txt",
        }
        for s, t in texts.items()
    ]
    seed_artifact(run_dir, "extract_reports/reports", reports)
    mentions = EntityMatcher(build_lexicon(entities)).match(list(texts), list(texts.values()))
    seed_artifact(run_dir, "match_entities/entity_mentions", mentions)
    by_study = mentions_by_study(mentions)
    finder = parse.EntityFinder(entities)
    rows = []
    for sid in seeds:
        raw = (
            teacher_text(sid)
            if teacher_text
            else "TEACHER\n" + rules_teacher.distill(texts[sid], by_study[sid])
        )
        parsed = parse.parse_response(raw, finder)
        named = list(dict.fromkeys(m.entity for m in sorted(by_study[sid], key=lambda m: m.start)))
        rows.append(
            {
                "study_id": sid,
                "model": "teacher-x",
                "prompt_hash": "h" + sid,
                "report": texts[sid],
                "entities": named,
                "raw_response": raw,
                "distilled_text": parse.distilled_text(parsed),
                "sentences": [p.text for p in parsed],
                "parsed_json": parse.parsed_json(parsed),
                "flags": [],
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "latency_s": 0.0,
                "cached": False,
                "truncated": False,
                "error": None,
            }
        )
    seed_artifact(run_dir, "seed_distill/seed_distillations", rows)
    teacher = SeedConfig(teacher="rules")
    settings = {
        "teacher": teacher.teacher,
        "client_json": teacher.client_config().model_dump_json(),
        "max_prompt_tokens": teacher.max_prompt_tokens,
    }
    seed_artifact(run_dir, "seed_distill/teacher_settings", [settings])
    return by_study


def write_student(run_dir, sha="a" * 64):
    seed_artifact(
        run_dir,
        "finetune_student/student_model",
        [
            {
                "adapter_dir": "finetune_student/adapter",
                "base_model": "finetune_student/base_model",
                "adapter_sha256": sha,
                "lora_r": 8,
                "lora_alpha": 16,
                "max_prompt": 64,
                "max_new_tokens": 32,
                "decoding": "greedy",
                "reprompt_rounds": 0,
                "n_train": 1,
                "n_heldout": 1,
                "n_skipped": 0,
            }
        ],
    )
    metrics = {
        "n_reports": 1,
        "n_entities": 1,
        "polarity_acc": 0.5,
        "exact_sentence_rate": 0.0,
        "unparseable_rate": 0.0,
        "coverage": 1.0,
        "report_exact": 0.0,
        "reports_per_s": 1.0,
    }
    seed_artifact(
        run_dir,
        "finetune_student/student_eval",
        [{"system": "student", **metrics}, {"system": "all_absent", **metrics}],
    )


def config(seed_teacher="rules"):
    return SimpleNamespace(
        run=SimpleNamespace(seed=0, device="cpu"), seed_distill=SeedConfig(teacher=seed_teacher)
    )


class ScriptedStudent:
    """Answers like the rules teacher (tagged STUDENT), garbage for `bad` studies; can crash on call N."""

    def __init__(self, bad=(), crash_on_call=None):
        self.bad, self.crash_on_call = set(bad), crash_on_call
        self.calls: list[list[str]] = []

    def generate(self, prompts):
        sids = []
        for p in prompts:
            report, _ = report_from_prompt(p)
            sids.append(next(s for s, t in TEXTS.items() if t == report))
        self.calls.append(sids)
        if self.crash_on_call == len(self.calls):
            raise RuntimeError("simulated crash (GPU lost)")
        matcher = EntityMatcher(build_lexicon(ENTITIES))
        out = []
        for sid in sids:
            if sid in self.bad:
                out.append("I am sorry, I cannot summarise this report")
            else:
                ms = mentions_by_study(matcher.match([sid], [TEXTS[sid]]))[sid]
                out.append(rules_teacher.distill(TEXTS[sid], ms))
        return out


def bulk_ctx(run_dir, cfg=None):
    return make_test_context(run_dir, cfg or config(), "bulk_distill")


def read_distilled(run_dir):
    return {
        r["study_id"]: r
        for r in pq.read_table(run_dir / "bulk_distill" / "distilled_reports.parquet").to_pylist()
    }


def test_crash_mid_run_resumes_with_only_the_unfinished_shards(tmp_path):
    write_upstream(tmp_path)
    write_student(tmp_path)
    cfg = bulk.Config(shard_size=2, retry_budget=0)
    crashing = ScriptedStudent(crash_on_call=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_direct(bulk_ctx(tmp_path), cfg, backend=crashing)
    shard_dir = tmp_path / "bulk_distill" / "shards"
    assert sorted(p.name for p in shard_dir.glob("shard_*.parquet")) == ["shard_00000.parquet"]
    assert not (tmp_path / "bulk_distill" / "distilled_reports.parquet").exists()

    resumed = ScriptedStudent()
    run_direct(bulk_ctx(tmp_path), cfg, backend=resumed)
    # 6 student reports in shards of 2: shard 0 was done, so only shards 1 and 2 are generated again.
    assert resumed.calls == [["s06", "s07"], ["s08", "s09"]]
    assert crashing.calls[0] == ["s03", "s05"]
    rows = read_distilled(tmp_path)
    assert sorted(rows) == sorted(TEXTS)  # every report exactly once (the merge checks duplicates too)
    assert {s: r["source"] for s, r in rows.items()} == {
        "s00": "teacher",
        "s01": "teacher",
        "s02": "teacher",
        "s04": "none",
        "s03": "student",
        "s05": "student",
        "s06": "student",
        "s07": "student",
        "s08": "student",
        "s09": "student",
    }
    assert rows["s05"]["distilled_text"] == "There is large right pneumothorax. There is no effusion."
    assert rows["s05"]["shard"] == 0 and rows["s09"]["shard"] == 2
    assert rows["s04"]["distilled_text"] == "" and rows["s04"]["entities"] == []

    again = ScriptedStudent()  # a third run with everything done generates nothing
    run_direct(bulk_ctx(tmp_path), cfg, backend=again)
    assert again.calls == []


def test_shard_groups_split_the_work_and_the_merge_equals_one_process(tmp_path):
    """bulk_distill.workers: N groups each distil every N-th shard into the stage's shard folder (in stage-gpu
    sub-runs, here one after the other in-process); the stage then only merges. A failed group leaves the
    other's shards, and its rerun distils only what it lacks."""
    one = tmp_path / "one"
    write_upstream(one)
    write_student(one)
    run_direct(bulk_ctx(one), bulk.Config(shard_size=2, retry_budget=1), backend=ScriptedStudent(bad={"s05"}))

    run_dir = tmp_path / "groups"
    write_upstream(run_dir)
    write_student(run_dir)
    cfg = bulk.Config(shard_size=2, retry_budget=1, workers=2)
    group = lambda g, student: bulk.distil_group(bulk_ctx(run_dir), cfg, g, 2, backend=student)  # noqa: E731
    with pytest.raises(
        RuntimeError, match=r"shard group 0/2: .*plan\.json is missing or was planned for other"
    ):
        group(0, ScriptedStudent())  # the pipeline plans before it hands the groups out
    assert bulk.plan_groups(bulk_ctx(run_dir), cfg, 2) == [0, 1]
    crashing = ScriptedStudent(bad={"s05"}, crash_on_call=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        group(1, crashing)
    first = ScriptedStudent(bad={"s05"})
    assert group(0, first) == 2
    assert first.calls == [["s03", "s05"], ["s08", "s09"]]  # shards 0 and 2 of 0, 1, 2
    assert crashing.calls == [["s06", "s07"]]  # shard 1
    assert bulk.plan_groups(bulk_ctx(run_dir), cfg, 2) == [1]  # group 0 is done
    again = ScriptedStudent()
    assert group(1, again) == 1 and again.calls == [["s06", "s07"]]
    assert bulk.plan_groups(bulk_ctx(run_dir), cfg, 2) == []
    merge = ScriptedStudent()
    run_direct(bulk_ctx(run_dir), cfg, backend=merge)
    assert merge.calls == []  # every shard was a group's: the stage only merged
    rows, reference = read_distilled(run_dir), read_distilled(one)
    assert rows == reference  # s05's QC retry came out of group 0's share (1 of the budget of 1)
    assert rows["s05"]["source"] == "teacher_retry"


def test_group_budgets_add_up_to_the_retry_budget():
    assert [bulk.group_budget(7, g, 3) for g in range(3)] == [3, 2, 2]
    assert [bulk.group_budget(1, g, 2) for g in range(2)] == [1, 0]
    assert bulk.group_shards(5, 1, 2) == [1, 3]


def test_teacher_rows_are_used_where_present(tmp_path):
    write_upstream(tmp_path)
    write_student(tmp_path)
    student = ScriptedStudent()
    run_direct(bulk_ctx(tmp_path), bulk.Config(shard_size=4, retry_budget=0), backend=student)
    asked = {s for call in student.calls for s in call}
    assert asked == {
        "s03",
        "s05",
        "s06",
        "s07",
        "s08",
        "s09",
    }  # never the seeds, never the entity-less report
    rows = read_distilled(tmp_path)
    assert rows["s00"]["raw_response"].startswith("TEACHER\n")
    assert rows["s00"]["model"] == "teacher-x"
    assert rows["s00"]["distilled_text"] == "There is small left pleural effusion. There is no pneumothorax."
    assert rows["s03"]["model"] == "student:" + "a" * 12


def test_qc_failing_student_answers_go_to_the_teacher_within_budget(tmp_path):
    write_upstream(tmp_path)
    write_student(tmp_path)
    student = ScriptedStudent(bad={"s05", "s07", "s09"})
    run_direct(bulk_ctx(tmp_path), bulk.Config(shard_size=2, retry_budget=2), backend=student)
    rows = read_distilled(tmp_path)
    # The budget covers the first two failures (shard order); the third is kept with its flags.
    assert rows["s05"]["source"] == "teacher_retry" and rows["s07"]["source"] == "teacher_retry"
    assert rows["s05"]["model"] == rules_teacher.MODEL_NAME
    assert rows["s05"]["distilled_text"] == "There is large right pneumothorax. There is no effusion."
    assert rows["s05"]["flags"] == []
    assert rows["s09"]["source"] == "student"
    assert rows["s09"]["distilled_text"] == ""
    assert "unparseable_line:0" in rows["s09"]["flags"]
    assert {"missing_entity:effusion", "missing_entity:pneumothorax", "missing_entity:edema"} <= set(
        rows["s09"]["flags"]
    )


def test_retry_budget_is_shared_across_a_resumed_run(tmp_path):
    write_upstream(tmp_path)
    write_student(tmp_path)
    cfg = bulk.Config(shard_size=2, retry_budget=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_direct(bulk_ctx(tmp_path), cfg, backend=ScriptedStudent(bad={"s05", "s09"}, crash_on_call=2))
    run_direct(bulk_ctx(tmp_path), cfg, backend=ScriptedStudent(bad={"s05", "s09"}))
    rows = read_distilled(tmp_path)
    assert rows["s05"]["source"] == "teacher_retry"  # used the one retry before the crash
    assert rows["s09"]["source"] == "student" and rows["s09"]["flags"]  # none left after the resume


def test_a_setting_of_the_other_backend_is_refused_naming_it(tmp_path):
    """One sub-config per backend: under transformers, a server setting is an error, not silently ignored."""
    from tasks.config import ConfigError

    with pytest.raises(pydantic.ValidationError, match=r"backend\.transformers\.vllm\s+Extra inputs"):
        bulk.Config(backend={"kind": "transformers", "vllm": {"port": 9000}})
    with pytest.raises(pydantic.ValidationError, match=r"backend\.openai\.vllm\.prot\s+Extra inputs"):
        bulk.Config(backend={"kind": "openai", "vllm": {"prot": 9000}})
    with pytest.raises(pydantic.ValidationError, match=r"backend\.openai\.gen_batch\s+Extra inputs"):
        bulk.Config(backend={"kind": "openai", "gen_batch": 4})
    assert bulk.Config(backend="transformers").backend == bulk.InProcessBackend()
    config = tmp_path / "c.yaml"
    config.write_text("bulk_distill:\n  backend: {kind: transformers, concurrency: 8}\n")
    with pytest.raises(ConfigError, match=r"bulk_distill\.backend\.transformers\.concurrency"):
        load_config(config)
    demo = load_config(REPO_ROOT / "configs" / "demo.yaml").bulk_distill.backend
    paper = load_config(REPO_ROOT / "configs" / "paper.yaml").bulk_distill.backend
    assert (demo.kind, demo.gen_batch) == ("transformers", 16)
    assert (paper.kind, paper.vllm.max_lora_rank, paper.vllm.max_model_len, paper.concurrency) == (
        "openai",
        16,
        4096,
        256,
    )


def test_the_students_base_is_one_explicit_kind():
    """finetune_student.base: a pretrained path or a tiny Llama's dims, never a magic path string."""
    with pytest.raises(pydantic.ValidationError, match=r"base\.pretrained\.dims\s+Extra inputs"):
        ft.Config(base={"kind": "pretrained", "dims": {"hidden_size": 64}})
    with pytest.raises(pydantic.ValidationError, match=r"base\.tiny\.path\s+Extra inputs"):
        ft.Config(base={"kind": "tiny", "path": "tiny"})
    with pytest.raises(
        pydantic.ValidationError, match=r"does not match any of the expected tags: 'pretrained', 'tiny'"
    ):
        ft.Config(base={"kind": "vicuna"})
    assert ft.Config().base == ft.PretrainedBase(path="models/vicuna-7b-v1.5")
    demo = load_config(REPO_ROOT / "configs" / "demo.yaml").finetune_student.base
    assert (demo.kind, demo.dims.hidden_size, demo.dims.num_attention_heads) == ("tiny", 64, 1)


def test_a_new_adapter_discards_old_shards(tmp_path):
    write_upstream(tmp_path)
    write_student(tmp_path, sha="a" * 64)
    run_direct(bulk_ctx(tmp_path), bulk.Config(shard_size=2, retry_budget=0), backend=ScriptedStudent())
    write_student(tmp_path, sha="b" * 64)
    fresh = ScriptedStudent()
    run_direct(bulk_ctx(tmp_path), bulk.Config(shard_size=2, retry_budget=0), backend=fresh)
    assert len(fresh.calls) == 3  # all shards regenerated with the new student
    assert read_distilled(tmp_path)["s03"]["model"] == "student:" + "b" * 12


def test_finetune_student_stage_then_bulk_with_the_transformers_backend(tmp_path):
    """The real stage path: tiny base built and LoRA-tuned, adapter saved, eval + loss written, then loaded
    by bulk_distill's transformers backend."""

    def teacher_text(sid):
        ms = mentions_by_study(EntityMatcher(build_lexicon(ENTITIES)).match([sid], [TEXTS[sid]]))[sid]
        return rules_teacher.distill(TEXTS[sid], ms)

    write_upstream(tmp_path, teacher_text)
    ctx = make_test_context(tmp_path, config(), "finetune_student")
    ft_cfg = ft.Config(
        held_out=0.34,
        decoding="entity_complete",
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        train={"lr": 1e-2, "epochs": 4, "batch_size": 1, "grad_accum": 1, "max_len": 160},
        generation={"max_prompt": 96, "max_new_tokens": 12, "batch_size": 2},
        base={
            "kind": "tiny",
            "dims": {
                "vocab_size": 400,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            },
        },
    )
    run_direct(ctx, ft_cfg)
    stage = tmp_path / "finetune_student"
    assert (stage / "adapter" / "adapter_model.safetensors").is_file()
    assert (stage / "base_model" / "config.json").is_file()
    adapter_config = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((stage / "base_model").resolve())  # not .attempt/
    evals = {r["system"]: r for r in pq.read_table(stage / "student_eval.parquet").to_pylist()}
    assert set(evals) == {"student", "student_greedy", "all_absent"}
    assert evals["student"]["coverage"] == 1.0  # entity-complete: a sentence for every requested entity
    assert (
        evals["student"]["n_reports"] == 1
        and evals["all_absent"]["n_entities"] == evals["student"]["n_entities"]
    )
    assert evals["student"]["reports_per_s"] > 0
    loss = pq.read_table(stage / "student_loss.parquet").to_pylist()
    assert [r["step"] for r in loss] == list(range(1, 9))  # 2 training reports x 4 epochs, batch 1
    model = pq.read_table(stage / "student_model.parquet").to_pylist()[0]
    assert model["adapter_dir"] == "finetune_student/adapter" and model["n_train"] == 2

    run_direct(
        bulk_ctx(tmp_path),
        bulk.Config(backend={"kind": "transformers", "gen_batch": 2}, shard_size=3, retry_budget=0),
    )
    rows = read_distilled(tmp_path)
    assert sorted(rows) == sorted(TEXTS)
    assert sum(r["source"] == "student" for r in rows.values()) == 6
    student_rows = [r for r in rows.values() if r["source"] == "student"]
    assert all(
        r["model"].startswith("student:") and r["model"].endswith("+entity_complete1") for r in student_rows
    )
    assert not any(f.startswith("missing_entity") for r in student_rows for f in r["flags"])
