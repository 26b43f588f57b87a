"""Which reports the (paid) teacher distils: n reports, seeded, stratified so rare entities are represented.

The student learns only what the seed set shows it. A uniform sample of 10,000 MIMIC reports holds a
handful of "sarcoidosis" or "abscess" reports at best, so before filling the set at random we reserve
up to `quota` reports for every entity, rarest entity first (a report reserved for a rare entity also
counts for the common entities it mentions). Half of the set at most goes to these quotas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def entity_quota(n_reports: int, n_entities: int) -> int:
    """Reports reserved per entity: together at most half of the seed set."""
    return max(1, math.ceil(n_reports / (2 * max(1, n_entities))))


def select_seed(
    report_entities: Mapping[str, set[str]], n_reports: int, seed: int, stratified: bool = True
) -> list[str]:
    """Sorted study ids of the seed set. `report_entities` maps study id -> entities it mentions.

    More requested than there are reports: all of them. Deterministic for a given seed. `stratified=False`:
    the first n of the seeded random order, as the paper draws its 10,000 seed reports.
    """
    if n_reports <= 0:
        raise ValueError(f"n_reports must be positive, got {n_reports}")
    ids = sorted(report_entities)
    if n_reports >= len(ids):
        return ids
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]  # one random order, reused by every step below
    if not stratified:
        return sorted(order[:n_reports])
    by_entity: dict[str, list[str]] = {}
    for sid in order:
        for e in sorted(report_entities[sid]):
            by_entity.setdefault(e, []).append(sid)
    quota = entity_quota(n_reports, len(by_entity))
    chosen: dict[str, None] = {}
    covered: dict[str, int] = dict.fromkeys(by_entity, 0)
    for entity in sorted(by_entity, key=lambda e: (len(by_entity[e]), e)):
        for sid in by_entity[entity]:
            if covered[entity] >= quota or len(chosen) >= n_reports // 2:
                break
            if sid not in chosen:
                chosen[sid] = None
                for e in report_entities[sid]:
                    covered[e] += 1
    for sid in order:
        if len(chosen) >= n_reports:
            break
        chosen.setdefault(sid, None)
    return sorted(chosen)
