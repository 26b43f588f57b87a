"""One report to distil, as both distillation stages see it: what the prompt shows and what QC checks against.

`seed_distill` (teacher) and `bulk_distill` (student, teacher retries) build the same record from a report row
and its stage-2 mentions, so the prompt text, the entity order and the QC polarities cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.distill.prompt import build_messages, ordered_entities, prompt_report

if TYPE_CHECKING:
    from models.distill.rules_teacher import Mention


@dataclass(frozen=True)
class DistillItem:
    study_id: str
    entities: list[str]  # in the order the report first mentions them: the order the answer follows
    report: (
        str  # the text the prompt shows (findings sentences dropped first when the whole report does not fit)
    )
    truncated: bool
    full_text: str  # the whole report (the rules teacher reads it, not the truncated one)
    mentions: tuple[Mention, ...]
    polarities: Mapping[str, set[str]]  # entity -> stage-2 polarities, for the answer's QC

    def messages(self) -> list[dict[str, str]]:
        """The Table 2 chat prompt."""
        return build_messages(self.report, self.entities)


def distill_item(report: dict, mentions: Sequence[Mention], max_prompt_tokens: int) -> DistillItem:
    """The record for a report row (study_id, text, findings, impression) and its mentions."""
    entities = ordered_entities(mentions)
    text, truncated = prompt_report(report, entities, max_prompt_tokens)
    polarities: dict[str, set[str]] = {}
    for m in mentions:
        polarities.setdefault(m.entity, set()).add(m.polarity)
    return DistillItem(
        study_id=report["study_id"],
        entities=entities,
        report=text,
        truncated=truncated,
        full_text=report["text"],
        mentions=tuple(mentions),
        polarities=polarities,
    )
