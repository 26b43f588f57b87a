"""The findings the generated corpus can show: what kind, where, how severe, and how they are drawn at random.

A finding is the single source of truth shared by the image renderer and the report writer, so that the
lesion drawn in the radiograph and the sentence written about it can never disagree.

Sides are the PATIENT's sides (radiology convention): on a frontal PA/AP image the patient's right lung is
on the image's left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDES = ("right", "left", "bilateral")


@dataclass(frozen=True)
class KindSpec:
    """Which sides, zones and severities a finding kind can take (anatomically sensible combinations)."""

    sides: tuple[str | None, ...]
    zones: tuple[str | None, ...]
    severities: tuple[str, ...]


MILD_TO_SEVERE = ("mild", "moderate", "severe")
SMALL_TO_LARGE = ("small", "moderate", "large")

# One entry per rendered finding class; names are Table 1 entities (configs/entities/table1.txt).
FINDING_KINDS: dict[str, KindSpec] = {
    "opacity": KindSpec(SIDES, ("upper", "middle", "lower"), MILD_TO_SEVERE),
    "consolidation": KindSpec(SIDES, ("upper", "middle", "lower"), MILD_TO_SEVERE),
    "pneumonia": KindSpec(SIDES, ("upper", "middle", "lower"), MILD_TO_SEVERE),
    "effusion": KindSpec(SIDES, ("base",), SMALL_TO_LARGE),
    "pneumothorax": KindSpec(("right", "left"), ("apex",), SMALL_TO_LARGE),
    "cardiomegaly": KindSpec((None,), (None,), MILD_TO_SEVERE),  # the heart: no side, no lung zone
    "nodule": KindSpec(("right", "left"), ("upper", "middle", "lower"), ("small", "large")),
    "mass": KindSpec(("right", "left"), ("upper", "middle", "lower"), ("small", "large")),
    "atelectasis": KindSpec(SIDES, ("base",), MILD_TO_SEVERE),
    "edema": KindSpec(("bilateral",), ("perihilar",), MILD_TO_SEVERE),
}
FINDING_CLASSES: tuple[str, ...] = tuple(FINDING_KINDS)

# Kinds that occupy the same lung region: never two of them in one zone of one lung (they would overlap).
_AIRSPACE = {"opacity", "consolidation", "pneumonia", "nodule", "mass"}


@dataclass(frozen=True)
class Finding:
    """One abnormality: kind (a Table 1 entity), patient side, lung zone and severity word."""

    kind: str
    side: str | None
    zone: str | None
    severity: str

    def __post_init__(self) -> None:
        spec = FINDING_KINDS.get(self.kind)
        if spec is None:
            raise ValueError(f"unknown finding kind {self.kind!r}; expected one of {FINDING_CLASSES}")
        for name, value, allowed in (
            ("side", self.side, spec.sides),
            ("zone", self.zone, spec.zones),
            ("severity", self.severity, spec.severities),
        ):
            if value not in allowed:
                raise ValueError(f"{self.kind}: {name}={value!r} is not one of {allowed}")

    @property
    def sides(self) -> tuple[str, ...]:
        """The single lungs this finding touches ('bilateral' -> both); empty for the heart."""
        if self.side is None:
            return ()
        return ("right", "left") if self.side == "bilateral" else (self.side,)


def _overlaps(a: Finding, b: Finding) -> bool:
    """Two findings clash if they are the same kind, or airspace lesions in the same zone of a shared lung."""
    if a.kind == b.kind:
        return True
    if a.kind in _AIRSPACE and b.kind in _AIRSPACE and a.zone == b.zone:
        return bool(set(a.sides) & set(b.sides))
    return False


def sample_finding(rng: np.random.Generator, kinds: tuple[str, ...] = FINDING_CLASSES) -> Finding:
    """Draw one finding uniformly over kind, then over that kind's sides, zones and severities."""
    kind = kinds[int(rng.integers(len(kinds)))]
    spec = FINDING_KINDS[kind]
    side = spec.sides[int(rng.integers(len(spec.sides)))]
    zone = spec.zones[int(rng.integers(len(spec.zones)))]
    severity = spec.severities[int(rng.integers(len(spec.severities)))]
    return Finding(kind, side, zone, severity)


def sample_findings(rng: np.random.Generator, abnormal: bool, max_findings: int) -> list[Finding]:
    """Findings of one study: none for a normal study, else 1..max_findings non-clashing ones."""
    if not abnormal:
        return []
    n_wanted = int(rng.integers(1, max_findings + 1))
    findings: list[Finding] = []
    for _ in range(8 * n_wanted):  # bounded retries; clashes are rare
        if len(findings) == n_wanted:
            break
        candidate = sample_finding(rng)
        if not any(_overlaps(candidate, f) for f in findings):
            findings.append(candidate)
    return findings
