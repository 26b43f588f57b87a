"""Row contracts of the `match_entities` stage: entity mentions and the corpus statistics of Fig. 2."""

from __future__ import annotations

from typing import ClassVar, Literal

from data_contracts.base import Row


class EntityMention(Row):
    """One entity mention in a report's `text`; offsets are character offsets into that text."""

    contract: ClassVar[str] = "entity_mentions"
    version: ClassVar[int] = 1
    study_id: str
    entity: str  # canonical entity of the configured list, lower case
    start: int
    end: int  # text[start:end] is the surface form as written ("Effusions")
    sentence_index: int  # 0-based sentence of the report the mention is in
    sentence: str
    descriptor_start: int  # text[descriptor_start:start] holds the descriptor words (== start when none)
    descriptors: list[str]  # the β words before the entity in its sentence, lower case
    polarity: Literal["positive", "negative", "uncertain"]


class EntityStat(Row):
    """How often an entity of the list is mentioned, by polarity (Fig. 2 (a)); zero rows are kept."""

    contract: ClassVar[str] = "entity_stats"
    version: ClassVar[int] = 1
    entity: str
    n_mentions: int
    n_positive: int
    n_negative: int
    n_uncertain: int
    n_reports: int  # reports with at least one mention
    share: float  # n_mentions / all mentions


class DescriptorStat(Row):
    """How often a descriptor phrase (the β words, space-joined) precedes an entity, by polarity (Fig. 2
    (b))."""

    contract: ClassVar[str] = "descriptor_stats"
    version: ClassVar[int] = 1
    descriptor: str
    n_mentions: int
    n_positive: int
    n_negative: int
    n_uncertain: int


class EntitySummary(Row):
    """Corpus-level numbers behind the paper's imbalance claim (negative:positive about 20:1)."""

    contract: ClassVar[str] = "entity_summary"
    version: ClassVar[int] = 1
    n_reports: int
    n_reports_with_mention: int
    n_mentions: int
    n_positive: int
    n_negative: int
    n_uncertain: int
    negative_to_positive: float  # n_negative / n_positive mentions (NaN when there is no positive)
    top_negative_descriptor: str  # most frequent descriptor among negative mentions ("" when none)
    top_positive_descriptor: str
    top_descriptor_ratio: (
        float  # count of the first over count of the second (the paper's "is no" vs "there is")
    )


class LexiconForm(Row):
    """One surface form of an entity in the list `match_entities` used: the side input later stages read
    (GLoRIA's entity words, MLM descriptor masking), so a different list reaches them and reruns them."""

    contract: ClassVar[str] = "lexicon"
    version: ClassVar[int] = 1
    entity: str
    form: str
    rank: int  # the entity's position in the list (list order is kept)
    source: str  # the list file it came from
