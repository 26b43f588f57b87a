"""The offline rules teacher: its sentences, its agreement with real labels (IU X-ray) and the stage
wrapper."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from data_contracts.io import read_artifact
from models.distill import parse, rules_teacher
from models.distill.prompt import build_messages, estimate_prompt_tokens
from models.distill.rules_teacher import Mention, distill, entity_phrase, merge_mentions
from models.text.entities import EntityMatcher, load_entity_list
from tasks import seed_distill
from tasks.config import RunConfig
from tests.context import make_test_context, run_direct, seed_artifact
from tests.real_data import REPO_ROOT, iu_xray_rows, report_text

# Only `run.seed` is read from the pipeline config; loading the full one would import every stage (torch,
# timm).
PIPELINE = SimpleNamespace(run=RunConfig(seed=0))

LEXICON = load_entity_list(REPO_ROOT / "configs" / "entities" / "table1.txt")
MATCHER = EntityMatcher(LEXICON)


def mentions_of(text: str) -> list[Mention]:
    return rules_teacher.mentions_by_study(MATCHER.match(["r"], [text])).get("r", [])


def test_sentences_in_the_table2_format_from_stage2_mentions():
    text = (
        "Mild left pleural effusion is seen. No pneumothorax. Findings may represent early pneumonia. "
        "Calcified granulomas. The cardiac silhouette is enlarged."
    )
    assert distill(text, mentions_of(text)).splitlines() == [
        "There is mild left pleural effusion.",
        "There is no pneumothorax.",
        "There may be early pneumonia.",
        "There is calcified granulomas.",
        "There is cardiac silhouette.",
    ]


def test_phrase_stops_at_clause_function_words_and_deid_marks():
    text = "There is streaky XXXX opacity in the left base, representing atelectasis; no large effusion."
    ms = {m.entity: m for m in mentions_of(text)}
    assert entity_phrase(text, ms["opacity"]) == "opacity"
    assert entity_phrase(text, ms["atelectasis"]) == "atelectasis"
    assert entity_phrase(text, ms["effusion"]) == "large effusion"
    assert ms["effusion"].polarity == "negative"
    with pytest.raises(ValueError, match="outside the report text"):
        entity_phrase("short", Mention("effusion", 3, 40, "positive"))


def test_one_sentence_per_entity_positive_beats_uncertain_beats_negative():
    ms = [
        Mention("effusion", 0, 8, "negative"),
        Mention("effusion", 30, 38, "positive"),
        Mention("pneumonia", 10, 19, "negative"),
        Mention("pneumonia", 50, 59, "uncertain"),
    ]
    merged = merge_mentions(ms)
    assert [(m.entity, m.polarity, m.start) for m in merged] == [
        ("effusion", "positive", 30),
        ("pneumonia", "uncertain", 50),
    ]
    assert distill("no new effusion; small effusion", []) == ""


# ------------------------------------------------------------------------------------------ real labels


def test_rules_distillations_agree_with_iu_problem_labels_at_least_as_well_as_stage2():
    """Per (report, entity mentioned in it): present or not, against the indexers' `Problems` list.

    Stage 2 says present when any mention is positive; the teacher when its parsed sentence is `present`.
    Only entities that occur in some `Problems` entry are scored (the others have no label at all).
    """
    rows = iu_xray_rows()
    ids, texts = [r["uid"] for r in rows], [report_text(r) for r in rows]
    problems = [r["Problems"] for r in rows]
    mentions = rules_teacher.mentions_by_study(MATCHER.match(ids, texts))
    finder = parse.EntityFinder(LEXICON.entities)
    labels = {sid: set(finder.find(p.replace(";", " ; "))) for sid, p in zip(ids, problems, strict=True)}
    scored = set().union(*labels.values())
    assert {"effusion", "cardiomegaly", "atelectasis", "opacity", "granuloma"} <= scored
    n = stage2_hits = teacher_hits = 0
    for sid, text in zip(ids, texts, strict=True):
        if sid not in mentions:
            continue
        teacher = parse.entity_certainties(parse.parse_response(distill(text, mentions[sid]), finder))
        stage2: dict[str, bool] = {}
        for m in mentions[sid]:
            stage2[m.entity] = stage2.get(m.entity, False) or m.polarity == "positive"
        for entity, positive in stage2.items():
            if entity in scored:
                truth = entity in labels[sid]
                n += 1
                stage2_hits += positive == truth
                teacher_hits += (teacher.get(entity) == "present") == truth
    assert n > 4000  # 1,924 reports, ~3 scored entities each
    assert teacher_hits >= stage2_hits, (teacher_hits / n, stage2_hits / n)
    assert teacher_hits / n > 0.9


# ------------------------------------------------------------------------------------------ stage


REPORTS = {
    "s1": ("Mild left pleural effusion. No pneumothorax.", "Small effusion."),
    "s2": ("Possible right lower lobe pneumonia.", "No effusion."),
    "s3": ("Heart size normal.", "No acute cardiopulmonary process."),  # no entity: not a seed
    "s4": ("Moderate cardiomegaly. Bibasilar atelectasis.", "Stable cardiomegaly."),
}


def write_upstream(run_dir: Path) -> None:
    rows = [
        {
            "study_id": sid,
            "subject_id": "p1",
            "split": "train",
            "findings": f,
            "impression": i,
            "text": f"{f} {i}",
            "source_path": f"{sid}.txt",
        }
        for sid, (f, i) in REPORTS.items()
    ]
    seed_artifact(run_dir, "extract_reports/reports", rows)
    table = MATCHER.match([r["study_id"] for r in rows], [r["text"] for r in rows])
    seed_artifact(run_dir, "match_entities/entity_mentions", table)


def test_stage_with_the_rules_teacher_writes_validated_artifacts(tmp_path):
    write_upstream(tmp_path)
    ctx = make_test_context(tmp_path, PIPELINE, stage="seed_distill")
    run_direct(ctx, seed_distill.Config(teacher="rules", n_reports=10))
    rows = read_artifact(tmp_path / "seed_distill" / "seed_distillations.parquet").to_pylist()
    assert [r["study_id"] for r in rows] == ["s1", "s2", "s4"]
    s1 = rows[0]
    assert s1["model"] == "rules-teacher-v1" and s1["entities"] == ["effusion", "pneumothorax"]
    assert s1["raw_response"] == "There is mild left pleural effusion.\nThere is no pneumothorax."
    assert s1["distilled_text"] == "There is mild left pleural effusion. There is no pneumothorax."
    assert s1["flags"] == [] and not s1["truncated"] and s1["error"] is None
    assert rows[1]["distilled_text"] == "There may be right lower lobe pneumonia. There is no effusion."
    usage = pq.read_table(tmp_path / "seed_distill" / "distill_usage.parquet").to_pylist()
    assert usage[0]["mode"] == "rules" and usage[0]["requests"] == 3 and usage[0]["estimated_cost_usd"] == 0.0
    assert pq.read_table(tmp_path / "seed_distill" / "distill_rejects.parquet").num_rows == 0


def test_stage_truncates_long_reports_and_records_it(tmp_path):
    write_upstream(tmp_path)
    ctx = make_test_context(tmp_path, PIPELINE, stage="seed_distill")
    base = estimate_prompt_tokens(build_messages("x", ["effusion", "pneumothorax"]))
    run_direct(ctx, seed_distill.Config(teacher="rules", n_reports=10, max_prompt_tokens=base + 8))
    rows = {
        r["study_id"]: r
        for r in pq.read_table(tmp_path / "seed_distill" / "seed_distillations.parquet").to_pylist()
    }
    assert rows["s1"]["truncated"] and rows["s1"]["report"] == "Small effusion."
