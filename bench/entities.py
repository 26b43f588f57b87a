"""Benchmark `match_entities` at MIMIC-CXR size (227,835 reports) on one core, against a naive baseline.

Corpus: the real IU X-ray reports resampled, plus reports written by the synthetic corpus generator
(`models.synth`) resampled, half and half (IU only with --no-synth). Measured:
* ours: `EntityMatcher.match` over the whole corpus (one trie regex scan per batch + numpy), reports/s;
* naive: per report, per entity, `re.finditer` over that entity's forms, then a NegEx-style 5-word window
  of negation cues before each match; timed on the first --baseline-n reports (it is slow), reports/s;
* contract validation of the `entity_mentions` table (`data_contracts.base.validate_table`), rows/s.
The naive baseline must find exactly the same spans as ours on its subset (checked).

Run by hand: `.venv/bin/python -m bench.entities [--n 227835] [--baseline-n 20000]`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages and tests

from data_contracts.base import validate_table  # noqa: E402
from data_contracts.entities import EntityMention  # noqa: E402
from models.text.entities import EntityLexicon, EntityMatcher, load_entity_list  # noqa: E402
from tests.real_data import REPO_ROOT, iu_xray_texts, negex_polarity  # noqa: E402

MIMIC_REPORTS = 227_835


def synth_texts(n: int, seed: int) -> list[str]:
    """FINDINGS + IMPRESSION bodies from the synthetic corpus generator (same writer as `ecamp synth`)."""
    from models.synth.findings import sample_findings
    from models.synth.reports import ReportStyle, write_body

    style = ReportStyle()
    texts = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        body, impression = write_body(sample_findings(rng, 0.5, 3), rng, style)
        texts.append(" ".join(s.text for s in body + impression))
    return texts


def build_corpus(n: int, use_synth: bool, seed: int) -> tuple[list[str], str]:
    rng = np.random.default_rng(seed)
    pools = [iu_xray_texts()]
    if use_synth:
        pools.append(synth_texts(5_000, seed))
    per_pool = [n // len(pools) + (1 if i < n % len(pools) else 0) for i in range(len(pools))]
    texts = [pool[j] for pool, k in zip(pools, per_pool, strict=True) for j in rng.integers(0, len(pool), k)]
    order = rng.permutation(len(texts))
    described = " + ".join(
        f"{k} resampled from {len(p)} {name}"
        for p, k, name in zip(pools, per_pool, ("IU X-ray", "synthetic"), strict=False)
    )
    return [texts[i] for i in order], described


def naive_match(texts: list[str], lexicon: EntityLexicon) -> list[tuple[int, str, int, int, str]]:
    """The straightforward implementation: one regex per entity, run over every report, NegEx window."""
    patterns = {
        entity: re.compile(
            r"\b(?:"
            + "|".join(re.escape(f).replace(r"\ ", r"\s+") for f in sorted(forms, key=len, reverse=True))
            + r")\b",
            re.IGNORECASE,
        )
        for entity, forms in _forms_by_entity(lexicon).items()
    }
    found = []
    for i, text in enumerate(texts):
        for entity, pattern in patterns.items():
            for m in pattern.finditer(text):
                found.append((i, entity, m.start(), m.end(), negex_polarity(text, m.start())))
    return found


def _forms_by_entity(lexicon: EntityLexicon) -> dict[str, list[str]]:
    forms: dict[str, list[str]] = {e: [] for e in lexicon.entities}
    for form, entity in lexicon.forms.items():
        forms[entity].append(form)
    return forms


def timed(fn, *args):
    """Result, wall seconds and CPU seconds of this process (the machine is shared: CPU time is what one
    core spent, wall time also counts waiting for a core)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return (result,), time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=MIMIC_REPORTS)
    parser.add_argument("--baseline-n", type=int, default=20_000)
    parser.add_argument("--no-synth", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    lexicon = load_entity_list(REPO_ROOT / "configs" / "entities" / "table1.txt")
    texts, described = build_corpus(args.n, not args.no_synth, args.seed)
    ids = [str(i) for i in range(len(texts))]
    chars = sum(map(len, texts))
    print(f"corpus: {len(texts)} reports ({described}), {chars / 1e6:.1f} M characters")
    print(
        f"cpu: os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()[0]:.1f} (single process, one "
        f"core)"
    )

    matcher = EntityMatcher(lexicon)
    (mentions,), ours_wall, ours_cpu = timed(matcher.match, ids, texts)
    ours_rate = len(texts) / ours_cpu
    print(
        f"ours : {mentions.num_rows} mentions, {ours_wall:.1f} s wall, {ours_cpu:.1f} s CPU "
        f"= {ours_rate:,.0f} reports/CPU-s ({len(texts) / ours_wall:,.0f} reports/wall-s)"
    )

    subset = texts[: args.baseline_n]
    (naive,), naive_wall, naive_cpu = timed(naive_match, subset, lexicon)
    naive_rate = len(subset) / naive_cpu
    print(
        f"naive: {len(naive)} mentions on {len(subset)} reports, {naive_wall:.1f} s wall, {naive_cpu:.1f} s "
        f"CPU = {naive_rate:,.0f} reports/CPU-s ({len(subset) / naive_wall:,.0f} reports/wall-s)"
    )
    wall_ratio = (len(texts) / ours_wall) / (len(subset) / naive_wall)
    print(f"speed-up: {ours_rate / naive_rate:.1f}x (CPU time), {wall_ratio:.1f}x (wall)")
    print(
        f"MIMIC size: ours {MIMIC_REPORTS / ours_rate:.1f} CPU-s, naive ~{MIMIC_REPORTS / naive_rate:.0f} "
        f"CPU-s"
    )

    report = np.asarray(mentions.column("study_id").to_pylist(), dtype=np.int64)
    keep = report < len(subset)
    starts, ends = mentions.column("start").to_numpy()[keep], mentions.column("end").to_numpy()[keep]
    ours_spans = set(zip(report[keep].tolist(), starts.tolist(), ends.tolist(), strict=True))
    naive_spans = {(i, s, e) for i, _, s, e, _ in naive}
    print(
        f"same spans as naive on the subset: {ours_spans == naive_spans} ({len(ours_spans)} vs "
        f"{len(naive_spans)})"
    )

    _, validate_wall, validate_cpu = timed(validate_table, mentions, EntityMention, "bench/entity_mentions")
    print(
        f"contract validation: {mentions.num_rows} rows, {validate_wall:.2f} s wall, {validate_cpu:.2f} s "
        f"CPU = {mentions.num_rows / validate_cpu:,.0f} rows/CPU-s"
    )


if __name__ == "__main__":
    main()
