"""Entity-complete decoding: repeats and unrequested sentences go, missing entities come back scored."""

from __future__ import annotations

import pytest

from models.distill import parse
from models.distill.complete import (
    FORMS,
    EntityCompletion,
    kept_sentences,
    missing_entities,
    scored_sentences,
)

FINDER = parse.EntityFinder(["effusion", "pneumothorax", "edema", "consolidation", "nodule"])


def test_kept_sentences_drops_repeats_loops_and_unrequested_entities():
    answer = (
        "There is no pleural effusion.\n"
        "There is no effusion.\n"  # repeat of an entity already said
        "There is no compared compared compared.\n"  # a loop naming no entity
        "There is no nodule.\n"  # not requested
        "no edema here\n"  # malformed
        "There is mild pulmonary edema."
    )
    assert kept_sentences(answer, ["effusion", "edema", "pneumothorax"], FINDER) == [
        "There is no pleural effusion.",
        "There is mild pulmonary edema.",
    ]


def no_generation(prompts):
    raise AssertionError("reprompt_rounds=0: nothing is re-prompted")


def scoring_only(scorer):
    """Steps 1 and 3 alone, every report's prompt being "PROMPT"."""
    return EntityCompletion(lambda report, entities: "PROMPT", no_generation, scorer, reprompt_rounds=0)


def test_missing_entities_get_the_form_the_scorer_prefers():
    calls = []

    def scorer(prompt, answers):
        calls.append((prompt, list(answers)))
        # prefer "absent" for pneumothorax, "uncertain" for consolidation
        liked = {"There is no pneumothorax.", "There may be consolidation."}
        return [0.0 if a.splitlines()[-1] in liked else -5.0 for a in answers]

    texts, counts = scoring_only(scorer)(
        ["R"],
        [["effusion", "pneumothorax", "consolidation"]],
        ["There is small left pleural effusion.\nThere is small left pleural effusion."],
        FINDER,
    )
    assert texts == [
        "There is small left pleural effusion.\nThere is no pneumothorax.\nThere may be consolidation."
    ]
    assert counts == {"kept": 1, "dropped": 1, "reprompted": 0, "scored": 2}
    # one scorer call per report; every candidate is the kept answer plus one form of one missing entity
    assert len(calls) == 1 and calls[0][0] == "PROMPT"
    kept = "There is small left pleural effusion.\n"
    assert calls[0][1] == [
        kept + f.format(entity=e) for e in ("pneumothorax", "consolidation") for f in FORMS.values()
    ]
    parsed = parse.entity_certainties(parse.parse_response(texts[0], FINDER))
    assert parsed == {"effusion": "present", "pneumothorax": "absent", "consolidation": "uncertain"}


def test_a_complete_answer_is_not_scored():
    def scorer(prompt, answers):
        raise AssertionError("nothing is missing, nothing to score")

    texts, counts = scoring_only(scorer)(
        ["R"], [["edema"]], ["There is no edema.\nThere is no edema."], FINDER
    )
    assert texts == ["There is no edema."]
    assert counts == {"kept": 1, "dropped": 1, "reprompted": 0, "scored": 0}
    assert scored_sentences("P", ["There is no edema."], [], scorer) == []


@pytest.mark.parametrize("answer", ["", "I cannot summarise this report."])
def test_an_empty_or_useless_answer_is_completed_for_every_entity(answer):
    texts, counts = scoring_only(lambda p, a: [-len(x) for x in a])(
        ["R"], [["edema", "nodule"]], [answer], FINDER
    )
    assert texts == ["There is edema.\nThere is nodule."]  # the shortest form wins with this scorer
    assert counts["scored"] == 2 and counts["kept"] == 0


def test_missing_entities_keeps_request_order_and_ignores_case_and_repeats():
    kept = ["There is no Pleural Effusion.", "There is mild edema."]
    assert missing_entities(kept, ["nodule", "effusion", "pneumothorax", "nodule", "edema"], FINDER) == [
        "nodule",
        "pneumothorax",
    ]


class Student:
    """Answers a prompt "REPORT|e1,e2" with `script[entity]` for each listed entity, and records the
    prompts."""

    def __init__(self, script):
        self.script, self.prompts = script, []

    def prompt_for(self, report, entities):
        return f"{report}|{','.join(entities)}"

    def generate(self, prompts):
        self.prompts += list(prompts)
        return ["\n".join(self.script.get(e, "") for e in p.split("|")[1].split(",")) for p in prompts]


def test_reprompting_asks_only_for_the_missing_entities_and_scoring_does_the_rest():
    student = Student({"pneumothorax": "There is no pneumothorax.", "edema": "There is no effusion."})
    scored = []

    def scorer(prompt, answers):
        scored.append((prompt, len(answers)))
        return [1.0 if a.endswith("There may be edema.") else 0.0 for a in answers]

    complete = EntityCompletion(student.prompt_for, student.generate, scorer, reprompt_rounds=1)
    texts, counts = complete(
        ["R1", "R2"],
        [["effusion", "pneumothorax", "edema"], ["effusion"]],
        ["There is small pleural effusion.\nThere is small pleural effusion.", "There is no effusion."],
        FINDER,
    )
    # one re-prompt, for report 1 only, listing its two missing entities; the reply about effusion (not asked
    # for this time) is ignored, so edema is still missing and gets the scorer's favourite form
    assert student.prompts == ["R1|pneumothorax,edema"]
    assert texts == [
        "There is small pleural effusion.\nThere is no pneumothorax.\nThere may be edema.",
        "There is no effusion.",
    ]
    assert scored == [("R1|effusion,pneumothorax,edema", 3)]  # scored after the full, original prompt
    assert counts == {"kept": 2, "dropped": 1, "reprompted": 1, "scored": 1}


def test_without_a_scorer_entities_still_missing_stay_missing():
    student = Student({})
    complete = EntityCompletion(student.prompt_for, student.generate, None, reprompt_rounds=2)
    texts, counts = complete(["R"], [["edema", "nodule"]], ["There is no edema."], FINDER)
    assert texts == ["There is no edema."] and counts["scored"] == 0
    assert student.prompts == ["R|nodule", "R|nodule"]  # two rounds, both asking for the one missing entity
