"""The stages in pipeline order, each module's declared `STAGE` record. A stage is listed once it works."""

from __future__ import annotations

import importlib
from functools import cache

from tasks.stage import Stage, base_stage, split_ref

STAGE_MODULES: list[str] = [
    "tasks.extract_reports",
    "tasks.match_entities",
    "tasks.seed_distill",
    "tasks.finetune_student",
    "tasks.bulk_distill",
    "tasks.train_gloria",
    "tasks.pretrain_ecamp",
    "tasks.evaluate",
]


@cache
def stages() -> tuple[Stage, ...]:
    found = tuple(importlib.import_module(name).STAGE for name in STAGE_MODULES)
    check_order(found)
    return found


def check_order(found: tuple[Stage, ...]) -> None:
    """Every read names an output of an earlier stage: the order above is a valid execution order.

    `stage__row` is a variant of `stage` (an ablation row run under its own folder): it writes what `stage`
    does.
    """
    written: dict[str, set[str]] = {}
    for stage in found:
        for ref in stage.reads:
            producer, name = split_ref(ref)
            if name not in written.get(base_stage(producer), set()):
                raise ValueError(f"{stage.name} reads '{ref}', which no earlier stage declares")
        written[stage.name] = set(stage.outputs)


def stage_names() -> list[str]:
    return [s.name for s in stages()]


def get_stage(name: str) -> Stage:
    for stage in stages():
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage '{name}' (stages: {', '.join(stage_names())})")


def producer_of(artifact: str) -> str | None:
    """The stage that declares output `artifact` (a bare name), for `ecamp lineage`."""
    for stage in stages():
        if artifact in stage.outputs:
            return stage.name
    return None


def stage_table() -> str:
    """The README's stage table, made from the declarations (a test keeps the README equal to it)."""
    lines = ["| # | stage | what it does | reads | writes (`<run_dir>/<stage>/…`) |", "|---|---|---|---|---|"]
    for i, s in enumerate(stages(), start=1):
        reads = [f"`{r}`" + (" (optional)" if r in s.optional else "") for r in s.reads]
        if s.input_files is not None:
            reads.insert(0, "input files")
        writes = [f"`{w}`" for w in s.writes] + [f"`{f}`" for f in s.files]
        lines.append(f"| {i} | `{s.name}` | {s.summary} | {', '.join(reads) or '—'} | {', '.join(writes)} |")
    return "\n".join(lines)
