"""match_entities: entity lists, inflections, spans, descriptors, polarity scope rules, statistics, stage."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from data_contracts.entities import EntityMention
from data_contracts.io import read_artifact
from models.text.entities import (
    TABLE1_SURFACE_FORMS,
    EntityListError,
    EntityMatcher,
    MatcherConfig,
    build_lexicon,
    corpus_summary,
    derive_entity_list,
    descriptor_stats,
    entity_stats,
    lexicon_from_rows,
    load_entity_list,
    trie_pattern,
    write_entity_list,
)
from models.text.negation import Cue, default_cues, negating_phrases, non_negating_phrases
from tasks.config import load_config
from tasks.match_entities import STAGE, Config, resolve_entity_list
from tests.context import make_test_context, run_direct, seed_artifact
from tests.real_data import REPO_ROOT, iu_xray_texts

TABLE1 = REPO_ROOT / "configs" / "entities" / "table1.txt"


@pytest.fixture(scope="module")
def matcher() -> EntityMatcher:
    return EntityMatcher(load_entity_list(TABLE1))


def mentions_of(matcher: EntityMatcher, *texts: str) -> list[dict]:
    return matcher.match([f"s{i}" for i in range(len(texts))], list(texts)).to_pylist()


def polarity(matcher: EntityMatcher, text: str, entity: str) -> str:
    found = [m["polarity"] for m in mentions_of(matcher, text) if m["entity"] == entity]
    assert len(found) == 1, f"expected one '{entity}' in {text!r}, found {found}"
    return found[0]


# --- entity lists -------------------------------------------------------------------------------------------
def test_table1_list_has_the_44_paper_entities_and_every_one_has_surface_forms():
    lexicon = load_entity_list(TABLE1)
    assert len(lexicon.entities) == 44
    assert lexicon.entities[:3] == ("abnormality", "abscess", "aerate")
    assert "copd" in lexicon.entities and "chf" in lexicon.entities
    assert set(lexicon.entities) == set(TABLE1_SURFACE_FORMS)
    assert lexicon.forms["opacities"] == "opacity" and lexicon.forms["congestive heart failure"] == "chf"


def test_entity_list_file_extra_forms_comments_and_regular_plurals(tmp_path):
    path = tmp_path / "ffa.txt"
    path.write_text(
        "# FFA-IR style list\nLeakage: leaking, leaked\n\nmicroaneurysm\nEffusion  # known word\n"
    )
    lexicon = load_entity_list(path)
    assert lexicon.entities == ("leakage", "microaneurysm", "effusion")
    assert lexicon.forms["leaked"] == "leakage" and lexicon.forms["leakages"] == "leakage"
    assert lexicon.forms["microaneurysms"] == "microaneurysm"
    assert lexicon.forms["effusions"] == "effusion"  # the built-in table is used for known entities
    found = mentions_of(EntityMatcher(lexicon), "Leaking microaneurysms, no effusions.")
    assert [(m["entity"], m["polarity"]) for m in found] == [
        ("leakage", "positive"),
        ("microaneurysm", "positive"),
        ("effusion", "negative"),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("effusion\neffusion\n", "entity 'effusion' is listed twice"),
        ("# only a comment\n", "no entities in the list"),
        ("effusion\n@@@\n", ":2: cannot read entity line '@@@'"),
        (
            "effusion\npleural: effusions\n",
            "surface form 'effusions' belongs to both 'effusion' and 'pleural'",
        ),
    ],
)
def test_bad_entity_lists_name_the_file_and_problem(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(EntityListError) as err:
        load_entity_list(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_entity_list_is_a_clear_error(tmp_path):
    with pytest.raises(EntityListError, match="entity list not found"):
        load_entity_list(tmp_path / "nope.txt")


def test_cue_that_is_also_an_entity_form_is_rejected():
    lexicon = build_lexicon(["effusion"])
    with pytest.raises(ValueError, match="cue 'effusion' is also 'effusion'"):
        EntityMatcher(lexicon, cues=(*default_cues(), Cue("effusion", "negative")))


def test_masking_negation_words_are_the_matchers_negation_cues(matcher):
    """One cue table: every phrase the MLM weighs as negation denies the entity after it here, and every
    phrase that cancels one there (pseudo, uncertainty) does not deny it here."""
    for phrase in negating_phrases():
        assert polarity(matcher, f"{phrase} effusion.", "effusion") == "negative", phrase
    for phrase in non_negating_phrases():
        assert polarity(matcher, f"{phrase} effusion.", "effusion") != "negative", phrase


def test_trie_pattern_prefers_the_longest_phrase():
    import re

    pattern = re.compile(r"\b(" + trie_pattern(["no", "no evidence of", "not", "nodule"]) + r")\b")
    assert [m.group(1) for m in pattern.finditer("no evidence of nodule not no  evidence of")] == [
        "no evidence of",
        "nodule",
        "not",
        "no  evidence of",
    ]


# --- matching, spans, inflections
# -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("surface", "entity"),
    [
        ("Effusions", "effusion"),
        ("opacities", "opacity"),
        ("opacification", "opacity"),
        ("hyperinflation", "hyperinflated"),
        ("Hyperinflated", "hyperinflated"),
        ("calcified", "calcification"),
        ("calcifications", "calcification"),
        ("nodules", "nodule"),
        ("masses", "mass"),
        ("fractures", "fracture"),
        ("dilated", "dilation"),
        ("dilatation", "dilation"),
        ("distended", "distention"),
        ("thickened", "thickening"),
        ("infiltrates", "infiltrate"),
        ("infiltration", "infiltrate"),
        ("collapsed", "collapse"),
        ("congested", "congestion"),
        ("consolidative", "consolidation"),
        ("edematous", "edema"),
        ("herniation", "hernia"),
        ("hemidiaphragms", "hemidiaphragm"),
        ("catheters", "catheter"),
        ("COPD", "copd"),
        ("congestive  heart\nfailure", "chf"),
    ],
)
def test_inflections_map_to_the_canonical_entity_and_spans_point_at_them(matcher, surface, entity):
    text = f"Findings: {surface} noted."
    (m,) = mentions_of(matcher, text)
    assert m["entity"] == entity
    assert text[m["start"] : m["end"]] == surface
    assert m["polarity"] == "positive"


def test_word_boundaries_no_match_inside_other_words(matcher):
    text = "Massive biomass, perihilar haze, hilarious, tuberculosisx, effusional."
    found = mentions_of(matcher, text)
    assert [(m["entity"], text[m["start"] : m["end"]]) for m in found] == [("perihilar", "perihilar")]


def test_spans_sentences_and_order_over_several_reports(matcher):
    texts = ["Heart size normal. Small right effusion. Mild edema!", "", "Pneumothorax? No. Atelectasis."]
    table = matcher.match(["a", "b", "c"], texts)
    rows = table.to_pylist()
    assert [(r["study_id"], r["entity"], r["sentence_index"]) for r in rows] == [
        ("a", "effusion", 1),
        ("a", "edema", 2),
        ("c", "pneumothorax", 0),
        ("c", "atelectasis", 2),
    ]
    for r in rows:
        text = texts["abc".index(r["study_id"])]
        assert text[r["start"] : r["end"]].lower().startswith(r["entity"][:5])
        assert r["sentence"] in text and text[r["start"] : r["end"]] in r["sentence"]
    assert rows[0]["sentence"] == "Small right effusion."
    assert table.schema.equals(EntityMention.arrow_schema())


def test_batches_give_the_same_result_as_one_scan():
    lexicon = load_entity_list(TABLE1)
    texts = [f"Report {i}: no effusion. Possible pneumonia {i}." for i in range(7)]
    ids = [str(i) for i in range(7)]
    one = EntityMatcher(lexicon, MatcherConfig(batch_size=100)).match(ids, texts)
    many = EntityMatcher(lexicon, MatcherConfig(batch_size=3)).match(ids, texts)
    assert one.equals(many) and one.num_rows == 14


SCANNER_CASES = [
    "No  evidence\nof pneumothorax. No, evidence of effusion. there\tis no_effusion there is no effusion",
    "Congestive heart\nfailure; congestive heart, failure. no evidence of no evidence of there is no",
    "Pneumonia cannot be excluded; can not be excluded. There is no evidence of mass 2 masses x_mass.",
    "Not only effusion but also edema, no change in the no longer seen. Non-calcified 3.5cm nodule!",
]


def test_non_ascii_batches_give_the_same_mentions_as_ascii(matcher):
    ascii_rows = matcher.match(["a"], [SCANNER_CASES[0]]).to_pylist()
    mixed_rows = matcher.match(["a", "b"], [SCANNER_CASES[0], "Pétite effusion."]).to_pylist()
    assert mixed_rows[: len(ascii_rows)] == ascii_rows
    assert [(m["entity"], m["descriptors"]) for m in mixed_rows[len(ascii_rows) :]] == [
        ("effusion", ["pétite"])
    ]


def test_bad_inputs_are_clear_errors(matcher):
    with pytest.raises(ValueError, match="2 study ids but 1 texts"):
        matcher.match(["a", "b"], ["no effusion"])
    with pytest.raises(TypeError, match=r"report 1 \(study 'b'\): text is NoneType, not str"):
        matcher.match(["a", "b"], ["no effusion", None])
    assert matcher.match([], []).num_rows == 0


# --- descriptors
# ---------------------------------------------------------------------------------------------
def test_descriptors_are_the_beta_words_before_the_entity(matcher):
    text = "There is no evidence of pneumothorax. There is mild pulmonary edema."
    found = mentions_of(matcher, text)
    assert [m["descriptors"] for m in found] == [["evidence", "of"], ["mild", "pulmonary"]]
    edema = found[1]
    assert text[edema["descriptor_start"] : edema["start"]] == "mild pulmonary "


def test_descriptors_never_cross_the_sentence_start(matcher):
    found = mentions_of(matcher, "Heart is normal. Effusion is small. Stable. Small effusion.")
    assert [m["descriptors"] for m in found] == [[], ["small"]]
    assert found[0]["descriptor_start"] == found[0]["start"]


def test_descriptors_strip_punctuation_and_follow_beta():
    lexicon = load_entity_list(TABLE1)
    text = "Lungs: (small, left) - effusion; no consolidation."
    three = EntityMatcher(lexicon, beta=3).match(["x"], [text]).to_pylist()
    assert [m["descriptors"] for m in three] == [["lungs", "small", "left"], ["left", "effusion", "no"]]
    zero = EntityMatcher(lexicon, beta=0).match(["x"], [text]).to_pylist()
    assert [m["descriptors"] for m in zero] == [[], []]
    long_words = "A " + "verylongwordthatfillsthewindow " * 3 + "effusion."
    (m,) = EntityMatcher(lexicon).match(["x"], [long_words]).to_pylist()
    assert m["descriptors"] == ["verylongwordthatfillsthewindow"] * 2
    assert long_words[m["descriptor_start"] :].startswith("verylongword")


# --- polarity and scope
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No pleural effusion or pneumothorax.", {"effusion": "negative", "pneumothorax": "negative"}),
        (
            "No focal consolidation, effusion, or pneumothorax.",
            {"consolidation": "negative", "pneumothorax": "negative"},
        ),
        ("Small effusion. No pneumothorax.", {"effusion": "positive", "pneumothorax": "negative"}),
        ("The effusion has resolved.", {"effusion": "negative"}),
        ("The left pleural effusion is no longer seen.", {"effusion": "negative"}),
        ("No longer any pneumothorax.", {"pneumothorax": "negative"}),
        ("Cannot exclude pneumonia.", {"pneumonia": "uncertain"}),
        ("Possible small nodule.", {"nodule": "uncertain"}),
        ("Opacity may represent atelectasis.", {"opacity": "positive", "atelectasis": "uncertain"}),
        ("Questionable hernia.", {"hernia": "uncertain"}),
        ("Pneumonia cannot be excluded.", {"pneumonia": "uncertain"}),
        ("Pneumonia is not excluded.", {"pneumonia": "uncertain"}),
        ("No change in the small effusion.", {"effusion": "positive"}),
        ("No increase in the right pneumothorax.", {"pneumothorax": "positive"}),
        ("Not only effusion but also edema.", {"effusion": "positive", "edema": "positive"}),
        (
            "No pneumothorax but there is a small effusion.",
            {"pneumothorax": "negative", "effusion": "positive"},
        ),
        ("No pneumothorax, however mild edema.", {"edema": "positive"}),
        ("No effusion although atelectasis persists.", {"atelectasis": "positive"}),
        ("No effusion; mild cardiomegaly.", {"effusion": "negative", "cardiomegaly": "positive"}),
        ("No pneumonia, possible atelectasis.", {"pneumonia": "negative", "atelectasis": "uncertain"}),
        ("Possible pneumonia without effusion.", {"pneumonia": "uncertain", "effusion": "negative"}),
        (
            "Effusion is smaller and atelectasis has resolved.",
            {"effusion": "positive", "atelectasis": "negative"},
        ),
        ("Pneumonia and effusion have resolved.", {"pneumonia": "negative", "effusion": "negative"}),
        ("The effusion has not resolved.", {"effusion": "positive"}),
        ("Non-calcified granuloma.", {"calcification": "negative", "granuloma": "positive"}),
        ("There is no evidence of pneumothorax.", {"pneumothorax": "negative"}),
        ("Free of consolidation.", {"consolidation": "negative"}),
        ("Negative for fracture.", {"fracture": "negative"}),
        ("There may be a small effusion.", {"effusion": "uncertain"}),
        ("Atelectasis versus pneumonia.", {"atelectasis": "uncertain", "pneumonia": "uncertain"}),
        ("The catheter has been removed.", {"catheter": "negative"}),
        ("Likely atelectasis.", {"atelectasis": "uncertain"}),
        ("Stable cardiomegaly.", {"cardiomegaly": "positive"}),
        (
            "The effusion seen on the prior examination, which was large, has resolved.",
            {"effusion": "positive"},
        ),
    ],
)
def test_polarity_scope_rules(matcher, text, expected):
    got = {m["entity"]: m["polarity"] for m in mentions_of(matcher, text)}
    assert {k: got.get(k) for k in expected} == expected, text


def test_negation_scope_stops_at_the_sentence_end_and_not_at_a_comma(matcher):
    found = mentions_of(matcher, "No effusion, pneumothorax, edema. Pneumonia.")
    assert [m["polarity"] for m in found] == ["negative", "negative", "negative", "positive"]


def test_post_cue_reach_is_limited_by_post_window():
    lexicon = load_entity_list(TABLE1)
    text = "Effusion in the left base seen on prior films has resolved."
    assert EntityMatcher(lexicon, MatcherConfig(post_window=8)).match(["x"], [text])["polarity"][
        0
    ].as_py() == ("negative")
    assert EntityMatcher(lexicon, MatcherConfig(post_window=3)).match(["x"], [text])["polarity"][
        0
    ].as_py() == ("positive")


def test_polarity_is_case_insensitive_and_ignores_line_breaks(matcher):
    assert polarity(matcher, "NO EVIDENCE\nOF PNEUMOTHORAX", "pneumothorax") == "negative"


# --- statistics
# -----------------------------------------------------------------------------------------------
TINY = [
    "There is no effusion. There is no pneumothorax. There is mild edema.",
    "There is no effusion. Possible pneumonia.",
    "There is small effusion.",
    "Normal chest.",
]


@pytest.fixture(scope="module")
def tiny(matcher):
    return matcher.match(["r1", "r2", "r3", "r4"], TINY)


def test_entity_stats_count_mentions_reports_and_polarity(tiny):
    stats = entity_stats(tiny, load_entity_list(TABLE1).entities)
    rows = {r["entity"]: r for r in stats.to_pylist()}
    assert stats.num_rows == 44
    assert rows["effusion"] == {
        "entity": "effusion",
        "n_mentions": 3,
        "n_positive": 1,
        "n_negative": 2,
        "n_uncertain": 0,
        "n_reports": 3,
        "share": pytest.approx(3 / 6),
    }
    assert (rows["pneumonia"]["n_uncertain"], rows["edema"]["n_positive"]) == (1, 1)
    assert rows["copd"]["n_mentions"] == 0
    assert stats.column("entity")[0].as_py() == "effusion"  # most frequent first


def test_descriptor_stats_and_summary(tiny):
    stats = descriptor_stats(tiny)
    rows = {r["descriptor"]: r for r in stats.to_pylist()}
    assert rows["is no"] == {
        "descriptor": "is no",
        "n_mentions": 3,
        "n_positive": 0,
        "n_negative": 3,
        "n_uncertain": 0,
    }
    assert rows["is mild"]["n_positive"] == 1 and rows["is small"]["n_positive"] == 1
    assert "" not in rows and "possible" in rows
    assert stats.column("descriptor")[0].as_py() == "is no"
    summary = corpus_summary(tiny, 4, stats)
    assert summary["n_reports"] == 4 and summary["n_reports_with_mention"] == 3 and summary["n_mentions"] == 6
    assert (summary["n_positive"], summary["n_negative"], summary["n_uncertain"]) == (2, 3, 1)
    assert summary["negative_to_positive"] == pytest.approx(1.5)
    assert summary["top_negative_descriptor"] == "is no"
    assert summary["top_positive_descriptor"] == "is mild"  # tie with "is small": first in sorted order
    assert summary["top_descriptor_ratio"] == pytest.approx(3.0)


def test_entity_stats_reject_mentions_of_unlisted_entities(tiny):
    with pytest.raises(ValueError, match=r"not in the list: \['edema', 'pneumonia', 'pneumothorax'\]"):
        entity_stats(tiny, ["effusion"])


def test_summary_of_no_positive_mentions_is_nan_not_a_crash(matcher):
    mentions = matcher.match(["a"], ["No effusion."])
    summary = corpus_summary(mentions, 1, descriptor_stats(mentions))
    assert math.isnan(summary["negative_to_positive"]) and summary["top_positive_descriptor"] == ""


def test_derived_entity_lists_top_k_and_top_percent(tmp_path):
    counts = {"effusion": 50, "edema": 30, "pneumonia": 20, "mass": 5, "copd": 0}
    stats = pa.table(
        {
            "entity": list(counts),
            "n_mentions": list(counts.values()),
            "n_positive": [0] * 5,
            "n_negative": [0] * 5,
            "n_uncertain": [0] * 5,
            "n_reports": [0] * 5,
            "share": [0.0] * 5,
        }
    )
    assert derive_entity_list(stats, "top_k", k=2) == ["effusion", "edema"]
    assert derive_entity_list(stats, "top_k", k=10) == ["effusion", "edema", "pneumonia", "mass"]
    assert derive_entity_list(stats, "top_percent", percent=40) == ["effusion", "edema"]  # ceil(0.4 * 5)
    assert derive_entity_list(stats, "top_percent", percent=10) == ["effusion"]
    with pytest.raises(ValueError, match="unknown strategy 'top_3'"):
        derive_entity_list(stats, "top_3")
    path = write_entity_list(tmp_path / "top2.txt", derive_entity_list(stats, "top_k", k=2), "Table 8: Top-2")
    assert load_entity_list(path).entities == ("effusion", "edema")


# --- the stage
# -------------------------------------------------------------------------------------------------
def test_stage_writes_mentions_stats_and_fig2_pngs(tmp_path):

    texts = [*TINY, "Possible small effusion, no pneumothorax."]
    reports = [
        {
            "study_id": f"s{i}",
            "subject_id": "p1",
            "split": "train",
            "findings": t,
            "impression": "",
            "text": t,
            "source_path": f"r{i}.txt",
        }
        for i, t in enumerate(texts)
    ]
    seed_artifact(tmp_path, "extract_reports/reports", reports)
    for beta, descriptors in ((1, (["small"], ["no"])), (2, (["possible", "small"], ["effusion", "no"]))):
        # β is pre-training's setting, read from there (the descriptors counted are the ones the MLM masks)
        config = load_config(None, [f"pretrain_ecamp.text.beta={beta}"])
        run_direct(make_test_context(tmp_path, config=config, stage=STAGE.name), Config())
        mentions = read_artifact(tmp_path / STAGE.name / "entity_mentions.parquet", EntityMention)
        assert mentions.num_rows == 8
        last = mentions.filter(pc.equal(mentions.column("study_id"), "s4")).to_pylist()
        assert [(m["entity"], m["polarity"], m["descriptors"]) for m in last] == [
            ("effusion", "uncertain", descriptors[0]),
            ("pneumothorax", "negative", descriptors[1]),
        ]
    summary = read_artifact(tmp_path / STAGE.name / "entity_summary.parquet").to_pylist()[0]
    assert (summary["n_reports"], summary["n_mentions"], summary["n_negative"]) == (5, 8, 4)
    for name in ("fig2a_entities.png", "fig2b_descriptors.png"):
        with PILImage.open(tmp_path / STAGE.name / name) as image:
            assert image.format == "PNG" and image.width >= 600
    ranked = ("effusion", "pneumothorax", "edema", "pneumonia")  # 4, 2, 1, 1 mentions; ties in list order
    lists = tmp_path / STAGE.name / "entity_lists"
    assert load_entity_list(lists / "entities_top20.txt").entities == ranked
    assert load_entity_list(lists / "entities_top10pct.txt").entities == ranked  # 5 of 44, 4 seen
    lexicon = lexicon_from_rows(read_artifact(tmp_path / STAGE.name / "lexicon.parquet").to_pylist())
    assert lexicon.entities == load_entity_list(TABLE1).entities and lexicon.forms["effusions"] == "effusion"
    assert STAGE.reads == ("extract_reports/reports",)
    assert resolve_entity_list("configs/entities/table1.txt") == TABLE1


# --- a report's mentions do not depend on its batch, by property
# ------------------------------------------------- A batch is scanned as one string. Reports are drawn from
# the words that matter (every surface form and cue, whole or broken by any gap, plus fillers) with the
# separators that decide phrase joins, sentences and clauses: whitespace of every kind, punctuation,
# underscores and digits glued to words.
def _scanner_phrases() -> tuple[list[str], list[str]]:
    """(multi-word phrases, single words) of every surface form and cue, plus fillers."""
    lexicon = load_entity_list(TABLE1)
    phrases = sorted({*lexicon.forms, *(c.phrase for c in default_cues())})
    words = sorted({w for p in phrases for w in p.split()})
    return [p for p in phrases if " " in p], words + ["the", "of", "and", "x", "2", "3.5cm", "mass_", "_"]


_PHRASES, _SINGLE = _scanner_phrases()
_GAPS = st.sampled_from([" ", " ", " ", "  ", "\n", "\t", "\n\n", ", ", ". ", "; ", "-", ":", "_", "", " ( "])
# A whole phrase, or a phrase whose words are kept apart by any gap (punctuation must stop a phrase match)
_BROKEN = st.tuples(st.sampled_from(_PHRASES), st.lists(_GAPS, min_size=4, max_size=4)).map(
    lambda pg: "".join(w + g for w, g in zip(pg[0].split(), pg[1], strict=False)).rstrip()
)
_TOKENS = st.one_of(st.sampled_from(_SINGLE), st.sampled_from(_PHRASES), _BROKEN)
_CASED = st.tuples(_TOKENS, st.sampled_from(["lower", "upper", "title"])).map(
    lambda tc: getattr(tc[0], tc[1])()
)
_REPORTS = st.lists(st.tuples(_CASED, _GAPS), max_size=40).map(lambda parts: "".join(w + g for w, g in parts))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reports=st.lists(_REPORTS, min_size=1, max_size=4))
def test_property_a_reports_mentions_do_not_depend_on_its_batch(matcher, reports):
    """Nothing crosses a report border: each report alone, the reports batched (any batch size), and the batch
    with a non-ASCII report added (another character path) give the same mentions."""
    ids = [f"s{i}" for i in range(len(reports))]
    one_by_one = [m for i, r in zip(ids, reports, strict=True) for m in matcher.match([i], [r]).to_pylist()]
    assert matcher.match(ids, reports).to_pylist() == one_by_one
    small = EntityMatcher(matcher.lexicon, MatcherConfig(batch_size=2))
    assert small.match(ids, reports).to_pylist() == one_by_one
    mixed = matcher.match([*ids, "accent"], [*reports, "Pétite effusion."]).to_pylist()
    assert [m for m in mixed if m["study_id"] != "accent"] == one_by_one


def test_real_reports_give_the_same_mentions_alone_and_batched(matcher):
    """The property above on the real IU X-ray reports (every one, in batches of 64 and one by one)."""
    texts = iu_xray_texts()
    ids = [f"r{i}" for i in range(len(texts))]
    batched = EntityMatcher(matcher.lexicon, MatcherConfig(batch_size=64)).match(ids, texts)
    one_by_one = [m for i, t in zip(ids, texts, strict=True) for m in matcher.match([i], [t]).to_pylist()]
    assert batched.num_rows > 5_000
    assert batched.to_pylist() == one_by_one
