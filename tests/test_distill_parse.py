"""Table 2 prompt rendering and hashing, report truncation, response parsing and QC flags, seed selection."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from models.distill.parse import (
    EntityFinder,
    distilled_text,
    entity_certainties,
    parse_response,
    parse_sentence,
    parsed_json,
    qc_flags,
    split_response,
)
from models.distill.prompt import (
    INSTRUCTION,
    SYSTEM_PROMPT,
    build_messages,
    estimate_prompt_tokens,
    fit_report,
    prompt_hash,
    prompt_report,
    split_sentences,
)
from models.distill.seed import entity_quota, select_seed
from tests.fake_openai_server import report_from_prompt

TABLE1 = [
    line.strip()
    for line in open("configs/entities/table1.txt").read().splitlines()
    if line.strip() and not line.startswith("#")
]
FINDER = EntityFinder(TABLE1)


# ------------------------------------------------------------------------------------------- prompt


def test_messages_are_table2_verbatim_with_report_and_entities_filled_in():
    msgs = build_messages("Mild   left pleural effusion.\nNo pneumothorax.", ["effusion", "pneumothorax"])
    assert [m["role"] for m in msgs] == ["system", "user", "user"]
    assert msgs[0]["content"] == "You are a knowledgeable and veteran doctor." == SYSTEM_PROMPT
    assert msgs[1]["content"].startswith(
        "Please help me analysis the medical reports and conclude them briefly."
    )
    assert (
        "'There may [a] [b].': when you are not sure whether the entity exists in the report." in INSTRUCTION
    )
    assert msgs[1]["content"].endswith(
        "there is no need of using 'and' or 'or' to connect two or more words."
    )
    last = msgs[2]["content"]
    assert last.startswith("—Example—\nReport: As compared to ~, the lung volumes have slightly decreased.")
    assert (
        "There is moderate pleural effusion.\nThere is mild over inflation.\nThere is descending aorta.\n"
        in last
    )
    assert last.endswith(
        "—Example END—\nGiven the report: Mild left pleural effusion. No pneumothorax.\n"
        "Entities: effusion, pneumothorax.\nConclusion:"
    )
    assert report_from_prompt(last) == (
        "Mild left pleural effusion. No pneumothorax.",
        ["effusion", "pneumothorax"],
    )


def test_prompt_hash_is_stable_and_changes_with_anything_that_changes_the_answer():
    msgs = build_messages("No effusion.", ["effusion"])
    h = prompt_hash(msgs, 0.0, 256)
    assert h == prompt_hash(build_messages("No  effusion.", ["effusion"]), 0.0, 256)  # whitespace-normalised
    assert len(h) == 24 and int(h, 16) >= 0
    others = {
        prompt_hash(build_messages("No effusion!", ["effusion"]), 0.0, 256),
        prompt_hash(build_messages("No effusion.", ["effusion", "edema"]), 0.0, 256),
        prompt_hash(msgs, 0.7, 256),
        prompt_hash(msgs, 0.0, 128),
    }
    assert h not in others and len(others) == 4


def test_empty_report_is_an_error():
    with pytest.raises(ValueError, match="empty report"):
        build_messages("   ", ["effusion"])


def test_long_report_loses_findings_sentences_first_then_impression_words():
    findings = " ".join(f"Finding sentence number {i} describes the lungs in detail." for i in range(200))
    impression = "Small left pleural effusion. No pneumothorax."
    base = estimate_prompt_tokens(build_messages("x", ["effusion"]))
    text, truncated = fit_report(findings, impression, ["effusion"], base + 200)
    assert truncated and text.endswith(" Small left pleural effusion. No pneumothorax.")
    assert text.startswith("Finding sentence number 0 ")
    assert estimate_prompt_tokens(build_messages(text, ["effusion"])) <= base + 200
    assert "number 199" not in text  # the tail of FINDINGS went first
    short, truncated = fit_report("Clear lungs.", impression, ["effusion"], 4000)
    assert not truncated and short == "Clear lungs. " + impression
    cut, truncated = fit_report("", " ".join(["effusion"] * 500), ["effusion"], base + 20)
    assert truncated and cut.startswith("effusion effusion") and len(cut) < 200
    with pytest.raises(ValueError, match="smaller than the fixed prompt"):
        fit_report(findings, impression, ["effusion"], base - 50)


def fit_report_reference(findings, impression, entities, max_prompt_tokens):
    """The algorithm `fit_report` replaced, kept verbatim as the reference: one FINDINGS sentence dropped per
    loop and the whole prompt re-rendered each time (quadratic: a 5 MB report took ~45 min)."""
    findings_sents, impression_sents = split_sentences(findings), split_sentences(impression)

    def render(f_sents, i_text):
        return " ".join(p for p in (" ".join(f_sents), i_text) if p)

    def fits(text):
        return bool(text) and estimate_prompt_tokens(build_messages(text, entities)) <= max_prompt_tokens

    text = render(findings_sents, " ".join(impression_sents))
    if not text:
        raise ValueError("report has neither findings nor impression")
    if fits(text):
        return text, False
    while findings_sents:
        findings_sents = findings_sents[:-1]
        text = render(findings_sents, " ".join(impression_sents))
        if fits(text):
            return text, True
    words = " ".join(impression_sents).split()
    while len(words) > 1:
        words = words[: max(1, len(words) * 3 // 4)]
        text = render([], " ".join(words))
        if fits(text):
            return text, True
    raise ValueError(
        f"max_prompt_tokens={max_prompt_tokens} is smaller than the fixed prompt itself "
        f"({estimate_prompt_tokens(build_messages('x', entities))} tokens); raise it"
    )


def outcome(fit, *args):
    try:
        return fit(*args)
    except ValueError as err:
        return ("ValueError", str(err))


WORDS = ["lungs", "clear", "effusion", "1.5", "cm", "Dr.", "no", "pneumothorax", "___", "é", "ßø", "x"]
GAPS = [" ", "  ", "\t", "\n", "\n\n", "\u00a0", "\u2028", "\x1c", " \r\n "]


def random_text(rng: random.Random, sentences: int) -> str:
    parts = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        sentence = rng.choice(GAPS).join(words) + rng.choice([".", "!", "?", "", ".."])
        parts.append(sentence + rng.choice(GAPS))
    return rng.choice(["", " ", "\n"]) + "".join(parts)


def test_fit_report_gives_exactly_the_old_algorithms_result_on_varied_inputs():
    rng = random.Random(12)
    entities_choices = [[], ["effusion"], ["effusion", "pneumothorax", "atelectasis", "cardiomegaly"]]
    cases = [("", "", ["effusion"], 500), ("   ", "\n", [], 500), ("One.", "", [], 10**6)]
    for _ in range(400):
        findings = random_text(rng, rng.choice([0, 0, 1, 2, 5, 30, 200]))
        impression = random_text(rng, rng.choice([0, 1, 2, 5, 60]))
        entities = rng.choice(entities_choices)
        base = estimate_prompt_tokens(build_messages("x", entities))
        budget = base + rng.choice([-5, 0, 1, 2, 3, 5, 10, 20, 50, 100, 400, 2000])
        cases.append((findings, impression, entities, budget))
    results = [outcome(fit_report, *case) for case in cases]
    assert results == [outcome(fit_report_reference, *case) for case in cases]

    # The cases cover every way out: untouched, findings cut, impression cut, and each error.
    def kind(case, result) -> str:
        if result[0] == "ValueError" or not result[1]:
            return "ValueError" if result[0] == "ValueError" else "kept"
        impression = " ".join(split_sentences(case[1]))
        return (
            "FINDINGS" if result[0].endswith(impression) else "IMPRESSION"
        )  # findings cut, impression whole

    kinds = Counter(kind(case, result) for case, result in zip(cases, results, strict=True))
    assert {"kept", "FINDINGS", "IMPRESSION", "ValueError"} <= set(kinds), kinds


def test_the_full_and_the_truncated_prompt_render_the_report_alike():
    """Issue 12 point 8: a report that fits goes as `Report.text`; one that does not loses sentences from the
    same rendering (no section labels that the full path never had)."""
    findings, impression = "Heart size is normal.  Lungs are clear.\nNo effusion.", "No acute process."
    report = {
        "text": " ".join(f"{findings} {impression}".split()),
        "findings": findings,
        "impression": impression,
    }
    full, truncated = prompt_report(report, ["effusion"], 4000)
    assert (full, truncated) == (report["text"], False)
    assert fit_report(findings, impression, ["effusion"], 4000) == (full, False)
    need = estimate_prompt_tokens(build_messages(full, ["effusion"]))
    cut, truncated = prompt_report(report, ["effusion"], need - 1)
    assert truncated and cut == "Heart size is normal. Lungs are clear. No acute process."


def test_fit_report_on_a_5mb_report_keeps_the_longest_fitting_findings_prefix():
    sentences = [f"Finding sentence number {i} describes the lungs in detail." for i in range(90_000)]
    findings, impression = " ".join(sentences), "Small left pleural effusion. No pneumothorax."
    assert len(findings) > 5_000_000
    entities = ["effusion", "pneumothorax"]
    text, truncated = fit_report(findings, impression, entities, 3800)
    kept = text.removesuffix(f" {impression}")
    n = kept.count(" describes the lungs in detail.")
    assert truncated and 200 < n < 400 and kept == " ".join(sentences[:n])
    assert estimate_prompt_tokens(build_messages(text, entities)) <= 3800
    one_more = f"{' '.join(sentences[: n + 1])} {impression}"
    assert estimate_prompt_tokens(build_messages(one_more, entities)) > 3800
    # Impression only, 5 MB: cut to 3/4 of its words again and again, the first length that fits, as before.
    cut, truncated = fit_report("", findings, entities, 3800)
    words = findings.split()
    cuts = [len(words)]
    while cuts[-1] > 1:
        cuts.append(max(1, cuts[-1] * 3 // 4))
    kept = next(i for i, c in enumerate(cuts) if len(cut) == len(" ".join(words[:c])))
    assert truncated and cut == " ".join(words[: cuts[kept]])
    assert estimate_prompt_tokens(build_messages(cut, entities)) <= 3800
    previous = " ".join(words[: cuts[kept - 1]])
    assert estimate_prompt_tokens(build_messages(previous, entities)) > 3800


# ------------------------------------------------------------------------------------------- parsing


def test_certainty_severity_and_location_of_sentences():
    cases = {
        "There is mild left pleural effusion.": ("present", ("effusion",), ("mild",), 2, ("left",)),
        "There is no pneumothorax.": ("absent", ("pneumothorax",), (), None, ()),
        "There may be pneumonia.": ("uncertain", ("pneumonia",), (), None, ()),
        "There may be no effusion.": ("absent", ("effusion",), (), None, ()),  # negation wins over hedging
        "There is moderate to severe cardiomegaly.": (
            "present",
            ("cardiomegaly",),
            ("moderate", "severe"),
            4,
            (),
        ),
        "There are bibasilar opacities.": ("present", ("opacity",), (), None, ("bibasilar",)),
        "There is severe hyperinflation.": ("present", ("hyperinflated",), ("severe",), 4, ()),
    }
    for text, (certainty, entities, severity, sev_bin, location) in cases.items():
        p = parse_sentence(text, FINDER)
        assert p.well_formed, text
        assert (p.certainty, p.entities, p.severity, p.severity_bin, p.location) == (
            certainty,
            entities,
            severity,
            sev_bin,
            location,
        ), text
    assert not parse_sentence("Pleural effusion is present", FINDER).well_formed


def test_split_response_handles_lists_and_run_on_lines():
    text = "1. There is mild edema.\n- There is no effusion. There may be pneumonia.\n\n* There is no mass."
    assert split_response(text) == [
        "There is mild edema.",
        "There is no effusion.",
        "There may be pneumonia.",
        "There is no mass.",
    ]


def test_qc_flags_name_each_problem():
    response = (
        "There is mild left pleural effusion.\nThere may be pneumonia.\nThe heart is normal\n"
        "There is no pneumothorax or effusion.\nThere is a small nodule."
    )
    parsed = parse_response(response, FINDER)
    flags = qc_flags(
        parsed,
        requested=["effusion", "pneumonia", "atelectasis", "pneumothorax"],
        stage2_polarities={"effusion": {"positive"}, "pneumonia": {"negative"}, "pneumothorax": {"negative"}},
    )
    assert flags == [
        "unparseable_line:2",
        "multi_entity_sentence:3",
        "hallucinated_entity:nodule",
        "missing_entity:atelectasis",
        "polarity_disagrees:pneumonia",
    ]
    assert entity_certainties(parsed) == {
        "effusion": "present",
        "pneumonia": "uncertain",
        "pneumothorax": "absent",
        "nodule": "present",
    }
    assert distilled_text(parsed).startswith(
        "There is mild left pleural effusion. There may be pneumonia. There is no"
    )
    assert "The heart is normal" not in distilled_text(parsed)
    assert json.loads(parsed_json(parsed))[0]["severity_bin"] == 2
    # two entities in one phrase, not joined by and/or: clean
    one_phrase = parse_response("There is normal cardiomediastinal contours.", FINDER)
    assert one_phrase[0].entities == ("cardiomediastinal", "contour")
    assert qc_flags(one_phrase, ["cardiomediastinal", "contour"], {}) == []
    assert qc_flags([], ["effusion"], {}) == ["empty_response"]
    assert (
        qc_flags(parse_response("There is no effusion.", FINDER), ["effusion"], {"effusion": {"negative"}})
        == []
    )


def test_entity_forms_are_matched_on_word_boundaries():
    assert FINDER.find("Opacities and effusions; perihilar haze; hilar fullness") == [
        "opacity",
        "effusion",
        "perihilar",
        "hilar",
    ]
    assert FINDER.find("the aortic knob") == []  # 'aortic' is not a form of 'aorta'
    assert FINDER.find("Hyperinflated lungs, COPD, CHF") == ["hyperinflated", "copd", "chf"]


# ------------------------------------------------------------------------------------------- seed


def synthetic_corpus(n: int = 2000) -> dict[str, set[str]]:
    """Common entities in most reports, 'sarcoidosis' in 5 reports, 'abscess' in 2, some reports without
    any."""
    corpus = {}
    for i in range(n):
        ents = set()
        if i % 2 == 0:
            ents.add("effusion")
        if i % 3 == 0:
            ents.add("atelectasis")
        if i in (7, 300, 901, 1500, 1999):
            ents.add("sarcoidosis")
        if i in (11, 1203):
            ents.add("abscess")
        corpus[f"s{i:05d}"] = ents
    return corpus


def test_seed_selection_is_seeded_stratified_and_sized():
    corpus = synthetic_corpus()
    seed = select_seed(corpus, 100, seed=0)
    assert len(seed) == 100 == len(set(seed)) and seed == sorted(seed)
    assert seed == select_seed(corpus, 100, seed=0)
    assert seed != select_seed(corpus, 100, seed=1)
    counts = Counter(e for sid in seed for e in corpus[sid])
    quota = entity_quota(100, 4)
    assert counts["abscess"] == 2 and counts["sarcoidosis"] == min(5, quota)  # rare entities are all there
    # a uniform sample of 100 from 2000 expects 0.25 sarcoidosis and 0.1 abscess reports
    assert counts["effusion"] >= quota and counts["atelectasis"] >= quota


def test_the_paper_literal_seed_draw_is_uniform_and_misses_the_rare_entities():
    corpus = synthetic_corpus()
    drawn = select_seed(corpus, 100, seed=0, stratified=False)
    assert len(drawn) == 100 == len(set(drawn)) and drawn == select_seed(
        corpus, 100, seed=0, stratified=False
    )
    ids = sorted(corpus)
    order = [ids[i] for i in np.random.default_rng(0).permutation(len(ids))]
    assert drawn == sorted(order[:100])  # the first 100 of the seeded order, no quotas
    counts = Counter(e for sid in drawn for e in corpus[sid])
    assert counts["abscess"] < 2  # what the stratified default exists for


def test_the_paper_literal_distillation_profile_changes_only_the_draw_and_the_retries():
    from models.resources import CONFIG_DIR
    from tasks.config import load_config

    paper = load_config(CONFIG_DIR / "paper.yaml")
    literal = load_config(CONFIG_DIR / "profiles" / "paper-literal-distillation.yaml")
    assert (paper.seed_distill.selection, literal.seed_distill.selection) == ("stratified", "random")
    assert literal.bulk_distill.retry_budget == 0 < paper.bulk_distill.retry_budget
    assert literal.model_dump(exclude={"seed_distill", "bulk_distill"}) == paper.model_dump(
        exclude={"seed_distill", "bulk_distill"}
    )


def test_seed_larger_than_corpus_is_everything_and_bad_n_is_an_error():
    corpus = synthetic_corpus(50)
    assert select_seed(corpus, 10_000, seed=0) == sorted(corpus)
    with pytest.raises(ValueError, match="n_reports must be positive"):
        select_seed(corpus, 0, seed=0)
