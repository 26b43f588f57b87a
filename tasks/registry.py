"""The stages in pipeline order. A stage is listed here only once it works end to end."""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

STAGE_MODULES: list[str] = [
    "tasks.extract_reports",
    "tasks.match_entities",
    "tasks.seed_distill",
    "tasks.finetune_student",
    "tasks.bulk_distill",
    "tasks.train_gloria",
    "tasks.pretrain_ecamp",
]


@cache
def stage_modules() -> tuple[ModuleType, ...]:
    return tuple(importlib.import_module(name) for name in STAGE_MODULES)


def stage_names() -> list[str]:
    return [m.NAME for m in stage_modules()]


def stage_module(name: str) -> ModuleType:
    for module in stage_modules():
        if module.NAME == name:
            return module
    raise KeyError(f"unknown stage '{name}' (stages: {', '.join(stage_names())})")
