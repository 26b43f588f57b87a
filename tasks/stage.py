"""The declared stage interface: one record says what a stage reads, writes and is configured by.

Everything that needs to know a stage's inputs or outputs reads this record (as Kedro reads its nodes): the
registry, the cache fingerprint, the context that refuses undeclared reads and writes, the success record
that verifies every output, `ecamp lineage` and the README's stage table. Nothing is scattered as loose
module globals, so an input cannot silently escape the fingerprint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from data_contracts.base import Row


def split_ref(ref: str) -> tuple[str, str]:
    """`stage/name` -> (stage, name); `name` is a Parquet artifact or a declared file output."""
    stage, sep, name = ref.partition("/")
    if not sep or not stage or not name:
        raise ValueError(f"artifact reference '{ref}' must look like 'stage/artifact'")
    return stage, name


def variant_name(stage: str, row: str) -> str:
    """The folder (and name) of `stage` run with one ablation row's overrides: `pretrain_ecamp__no_sr`."""
    return f"{stage}__{row}"


def base_stage(name: str) -> str:
    """The declared stage a run name belongs to (`pretrain_ecamp__no_sr` -> `pretrain_ecamp`)."""
    return name.split("__", 1)[0]


@dataclass(frozen=True)
class FileSet:
    """Files that one input lists (the images a manifest names), wherever they are. They enter the
    fingerprint file by file, by their stamps (`data_contracts.stamps`), as one lineage entry
    `<listed_in>#<name>`; a missing one is not an error (the stage rejects its row, naming it)."""

    listed_in: Path
    name: str
    paths: tuple[str, ...]  # absolute, exactly as the stage will open them


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    `reads`: upstream outputs (`stage/name`, Parquet or declared files) whose content hashes enter the
    fingerprint. `optional` lists the reads the stage can run without (it logs a warning saying what it does
    instead) and the file outputs only some configurations write. `writes`: its Parquet outputs and their row
    contracts. `files`: its other outputs (weights, adapters, tokenizers, plot folders), hashed and verified
    like the Parquet ones. `sections`: config sections it reads besides its own and `run`. `input_files`:
    files and folders outside the run directory it reads (the MIMIC tree, a manifest, a lesion-box CSV, an
    entity list), and `FileSet`s of the files an input lists (a manifest's images), given the whole config;
    the stamps of every file in them enter the cache key and the lineage. `preflight`: checks of the whole
    config that must hold before the stage (and, from the CLI, before the whole run) starts, e.g. that
    pre-training's initialization is chosen and exists. `inputs_hint`: which config keys name the input files,
    said when one is missing. `gpu`: the stage trains or generates with a model and belongs on the GPU pool.
    `retries`: Prefect retries of a transient failure (an LLM endpoint or a file system that hiccups);
    deterministic errors are never retried.
    """

    name: str
    version: str
    config: type
    run: Callable[..., None]
    summary: str
    reads: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    writes: Mapping[str, type[Row]] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()
    input_files: Callable[[Any], list[Path | FileSet]] | None = None
    preflight: Callable[[Any], None] | None = None
    inputs_hint: str = ""
    gpu: bool = False
    retries: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "writes", MappingProxyType(dict(self.writes)))
        for ref in self.reads:
            split_ref(ref)
        if stray := set(self.optional) - set(self.reads) - set(self.files):
            raise ValueError(f"{self.name}: optional {stray} are neither reads nor file outputs")
        if clash := set(self.writes) & set(self.files):
            raise ValueError(f"{self.name}: {clash} declared both as Parquet and as file outputs")

    @property
    def code_version(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def outputs(self) -> tuple[str, ...]:
        return (*self.writes, *self.files)
