"""The real fixtures in tests/data/real (copied in with their provenance) as tests and benchmarks read them.

Side-effect free (conftest.py sets Prefect up), so benchmarks import it too. The IU X-ray report text is what
our stages see of a report: findings + impression, whitespace folded.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
REAL_DATA = REPO_ROOT / "tests" / "data" / "real"  # tests never read outside it
IU_XRAY_REPORTS = REAL_DATA / "iu_xray" / "reports_dev.csv"
NEGEX_CUES = re.compile(r"\b(?:no|not|without|negative|free|absence|absent|denies|denied)\b")


def iu_xray_rows() -> list[dict[str, str]]:
    """Every IU X-ray dev report as its CSV row (uid, MeSH, Problems, ..., findings, impression)."""
    with IU_XRAY_REPORTS.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def report_text(row: dict[str, str]) -> str:
    return " ".join(f"{row['findings']} {row['impression']}".split())


def iu_xray_texts() -> list[str]:
    """Findings + impression of every IU X-ray dev report, in file order ("" where both are empty)."""
    return [report_text(row) for row in iu_xray_rows()]


def negex_polarity(text: str, start: int) -> str:
    """The plain NegEx baseline our polarity is compared with: negative when a negation cue is among the
    5 words before the entity (across sentences, no scope, no uncertainty)."""
    window = " ".join(text[:start].split()[-5:]).lower()
    return "negative" if NEGEX_CUES.search(window) else "positive"
