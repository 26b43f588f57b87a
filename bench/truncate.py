"""Benchmark: teacher-prompt truncation (`models.distill.prompt.fit_report`) on huge reports, old vs new.

The old algorithm (copied below as the baseline) dropped one FINDINGS sentence per loop and re-rendered the
whole prompt each time: quadratic in the report's length. The new one finds the same cut by galloping and
bisection over the candidates (O(log n) renders); both give the same text, checked here on every size the
old one is run on. Reports: FINDINGS made of the real IU X-ray findings (tests/data/real) repeated to the
size, and one real IMPRESSION; `max_prompt_tokens` 3800 (seed_distill's default). The old algorithm is
only run up to --old-max characters (default 400,000): at 5 MB it takes ~45 min (quadratic extrapolation
from 400 KB); pass --old-max 0 to run it anyway. Times are CPU seconds of one call (time.process_time: the
development machine's 2 cores are shared, so wall time says more about the neighbours than about the code).

    .venv/bin/python bench/truncate.py [--old-max 400000]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.distill.prompt import (  # noqa: E402
    build_messages,
    estimate_prompt_tokens,
    fit_report,
    split_sentences,
)

IU_REPORTS = REPO / "tests" / "data" / "real" / "iu_xray" / "reports_dev.csv"
SIZES = (100_000, 400_000, 5_000_000)
ENTITIES = ["effusion", "pneumothorax", "consolidation", "cardiomegaly"]
MAX_PROMPT_TOKENS = 3800


def fit_report_old(
    findings: str, impression: str, entities: Sequence[str], max_prompt_tokens: int
) -> tuple[str, bool]:
    """`fit_report` before the fix, verbatim: one sentence dropped and the whole prompt re-rendered per
    loop."""
    findings_sents, impression_sents = split_sentences(findings), split_sentences(impression)

    def render(f_sents: list[str], i_text: str) -> str:
        parts = [
            f"FINDINGS: {' '.join(f_sents)}" if f_sents else "",
            f"IMPRESSION: {i_text}" if i_text else "",
        ]
        return " ".join(p for p in parts if p)

    def fits(text: str) -> bool:
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
    raise ValueError(f"max_prompt_tokens={max_prompt_tokens} is smaller than the fixed prompt itself")


def iu_findings_and_impression() -> tuple[str, str]:
    with IU_REPORTS.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    findings = " ".join(r["findings"] for r in rows if r["findings"])
    impression = next(r["impression"] for r in rows if len(r["impression"]) > 40)
    return findings, impression


def seconds(fit: Callable[..., tuple[str, bool]], *args: object) -> tuple[float, tuple[str, bool]]:
    start = time.process_time()
    result = fit(*args)
    return time.process_time() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-max", type=int, default=400_000, help="largest size the old algorithm runs on")
    args = parser.parse_args()
    source, impression = iu_findings_and_impression()
    print("| findings size | old (CPU s) | new (CPU s) | speed-up | same result |")
    print("|---|---|---|---|---|")
    for size in SIZES:
        findings = (source * (size // len(source) + 1))[:size]
        new_s, new = seconds(fit_report, findings, impression, ENTITIES, MAX_PROMPT_TOKENS)
        if args.old_max and size > args.old_max:
            print(f"| {size:,} chars | not run (--old-max) | {new_s:.3f} s | – | – |")
            continue
        old_s, old = seconds(fit_report_old, findings, impression, ENTITIES, MAX_PROMPT_TOKENS)
        print(f"| {size:,} chars | {old_s:.2f} s | {new_s:.3f} s | {old_s / new_s:,.0f}x | {old == new} |")


if __name__ == "__main__":
    main()
