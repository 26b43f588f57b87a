"""Stage `match_entities`: find the entity list's mentions in every report, with β descriptor words and
polarity, and the corpus statistics of the paper's Fig. 2 (entity frequencies, descriptor imbalance)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from pydantic import Field

from data_contracts.entities import DescriptorStat, EntityMention, EntityStat, EntitySummary, LexiconForm
from data_contracts.reports import Report
from models.resources import REPO_ROOT
from models.text.entities import (
    EntityMatcher,
    MatcherConfig,
    corpus_summary,
    derive_entity_list,
    descriptor_stats,
    entity_stats,
    lexicon_rows,
    load_entity_list,
    write_entity_list,
)
from tasks.base import StageConfig, StageContext
from tasks.stage import Stage

ENTITY_LISTS = "entity_lists"  # Table 8's derived lists, as files a later run can point entity_list at
BETA = "pretrain_ecamp.text.beta"  # descriptor words before an entity: the ones the MLM masks, one setting


class Config(StageConfig):
    entity_list: str = Field(
        "configs/entities/table1.txt",
        description="entity list file; relative paths resolve against the repo root",
    )
    matcher: MatcherConfig = Field(default_factory=MatcherConfig)
    plot_top_n: int = Field(20, ge=1, description="bars in the Fig. 2 plots; the rest is merged as 'others'")
    derived_top_k: int = Field(20, ge=1, description="Table 8 'Top-20' list written from this corpus")
    derived_top_percent: float = Field(10.0, gt=0, le=100, description="Table 8 'Top-10%' list")


def resolve_entity_list(path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else REPO_ROOT / candidate


def _top_with_others(
    labels: list[str], counts: list[list[int]], top_n: int
) -> tuple[list[str], list[list[int]]]:
    """Keep the `top_n` first bars and merge the rest into one 'others' bar, as Fig. 2 does."""
    if len(labels) <= top_n:
        return labels, counts
    rest = [sum(column) for column in zip(*counts[top_n:], strict=True)]
    return [*labels[:top_n], "others"], [*counts[:top_n], rest]


def plot_entity_frequencies(stats: pa.Table, path: Path, top_n: int) -> Path:
    """Fig. 2 (a): mentions per entity, stacked by polarity."""
    rows = stats.to_pylist()
    labels, counts = _top_with_others(
        [r["entity"] for r in rows],
        [[r["n_positive"], r["n_negative"], r["n_uncertain"]] for r in rows],
        top_n,
    )
    return _stacked_bars(labels, counts, ("positive", "negative", "uncertain"), "Entity mentions", path)


def plot_descriptor_frequencies(stats: pa.Table, path: Path, top_n: int) -> Path:
    """Fig. 2 (b): the most frequent descriptor phrases, positive vs negative (uncertain stacked on top)."""
    rows = stats.to_pylist()
    labels, counts = _top_with_others(
        [r["descriptor"] for r in rows],
        [[r["n_positive"], r["n_negative"], r["n_uncertain"]] for r in rows],
        top_n,
    )
    return _stacked_bars(labels, counts, ("positive", "negative", "uncertain"), "Descriptors (β words)", path)


def _stacked_bars(
    labels: list[str], counts: list[list[int]], series: tuple[str, ...], title: str, path: Path
) -> Path:
    from matplotlib.figure import Figure  # here, not at import: the registry imports every stage module

    # Figure without pyplot: no global figure state, no display backend; savefig picks Agg for .png
    fig = Figure(figsize=(max(6.0, 0.35 * len(labels) + 2), 4.5))
    ax = fig.add_subplot()
    bottom = [0] * len(labels)
    for k, (name, color) in enumerate(zip(series, ("tab:green", "tab:red", "tab:orange"), strict=True)):
        values = [c[k] for c in counts]
        ax.bar(range(len(labels)), values, bottom=bottom, label=name, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("mentions")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)  # Agg canvas, chosen by the .png suffix
    return path


def write_derived_lists(ctx: StageContext, cfg: Config, entities: pa.Table, source: str) -> None:
    """Table 8's alternative entity lists from this corpus's frequencies, as files a later run can point
    `match_entities.entity_list` at (entity selection ablation)."""
    for name, strategy, arg in (
        (f"entities_top{cfg.derived_top_k}.txt", "top_k", {"k": cfg.derived_top_k}),
        (
            f"entities_top{cfg.derived_top_percent:g}pct.txt",
            "top_percent",
            {"percent": cfg.derived_top_percent},
        ),
    ):
        chosen = derive_entity_list(entities, strategy, **arg)
        write_entity_list(
            ctx.path(f"{ENTITY_LISTS}/{name}"),
            chosen,
            f"Table 8 variant ({strategy} {arg}) of {source}, by mentions",
        )


def run(ctx: StageContext, cfg: Config) -> None:
    lexicon = load_entity_list(resolve_entity_list(cfg.entity_list))
    ctx.write("lexicon", lexicon_rows(lexicon))
    matcher = EntityMatcher(lexicon, cfg.matcher, beta=ctx.config.setting(BETA))
    reports = ctx.read("extract_reports/reports", Report)
    study_ids = reports.column("study_id").to_pylist()
    mentions = matcher.match(study_ids, reports.column("text").to_pylist())
    ctx.write("entity_mentions", mentions)

    entities = entity_stats(mentions, lexicon.entities)
    descriptors = descriptor_stats(mentions)
    summary = corpus_summary(mentions, reports.num_rows, descriptors)
    ctx.write("entity_stats", entities)
    ctx.write("descriptor_stats", descriptors)
    ctx.write("entity_summary", [summary])
    plot_entity_frequencies(entities, ctx.path("fig2a_entities.png"), cfg.plot_top_n)
    plot_descriptor_frequencies(descriptors, ctx.path("fig2b_descriptors.png"), cfg.plot_top_n)
    write_derived_lists(ctx, cfg, entities, lexicon.source)
    ctx.log.info(
        "%d mentions in %d of %d reports (%d entities of %s); negative:positive %.1f, '%s' vs '%s' %.1f",
        summary["n_mentions"],
        summary["n_reports_with_mention"],
        summary["n_reports"],
        len(lexicon.entities),
        lexicon.source,
        summary["negative_to_positive"],
        summary["top_negative_descriptor"],
        summary["top_positive_descriptor"],
        summary["top_descriptor_ratio"],
    )


STAGE = Stage(
    name="match_entities",
    version="2",
    config=Config,
    run=run,
    summary="entity mentions with descriptors and polarity (§3.1), Fig. 2 statistics, Table 8 entity lists",
    reads=("extract_reports/reports",),
    writes={
        "lexicon": LexiconForm,
        "entity_mentions": EntityMention,
        "entity_stats": EntityStat,
        "descriptor_stats": DescriptorStat,
        "entity_summary": EntitySummary,
    },
    files=("fig2a_entities.png", "fig2b_descriptors.png", ENTITY_LISTS),
    sections=(BETA,),
    input_files=lambda config: [resolve_entity_list(config.match_entities.entity_list)],
    inputs_hint="match_entities.entity_list",
)
