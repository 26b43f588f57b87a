"""What a stage sees: its config section type and the context through which it reads and writes artifacts.

Stages never build paths to other stages' files or write Parquet themselves: going through the context is
what makes every output validated, atomic and traceable to the exact upstream versions it was made from.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from data_contracts import catalog
from data_contracts.base import Row
from data_contracts.io import ArtifactInfo, Lineage, Upstream, read_artifact_and_info, write_artifact

T = TypeVar("T")


class StageConfig(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class MissingUpstreamError(FileNotFoundError):
    """An upstream artifact a stage needs has not been produced in this run directory."""


def split_ref(ref: str) -> tuple[str, str]:
    stage, sep, name = ref.partition("/")
    if not sep or not stage or not name:
        raise ValueError(f"artifact reference '{ref}' must look like 'stage/artifact'")
    return stage, name


def artifact_path(run_dir: Path, ref: str) -> Path:
    stage, name = split_ref(ref)
    return Path(run_dir) / stage / f"{name}.parquet"


@dataclass
class StageContext:
    run_dir: Path
    stage: str
    config: Any
    log: logging.Logger | logging.LoggerAdapter
    run_id: str = "local"
    config_hash: str = ""
    code_version: str = ""
    inputs: list[Upstream] = field(default_factory=list)
    outputs: dict[str, ArtifactInfo] = field(default_factory=dict)
    upstream: dict[str, Upstream] = field(default_factory=dict)

    @property
    def stage_dir(self) -> Path:
        return Path(self.run_dir) / self.stage

    def has(self, ref: str) -> bool:
        return artifact_path(self.run_dir, ref).exists()

    def read(self, ref: str, contract: type[Row] | None = None) -> pa.Table:
        """Read and validate an upstream artifact, recording it as an input of what this stage writes."""
        path = artifact_path(self.run_dir, ref)
        if not path.exists():
            producer, _ = split_ref(ref)
            raise MissingUpstreamError(
                f"{self.stage} needs '{ref}' but {path} does not exist: run stage '{producer}' first"
            )
        table, info = read_artifact_and_info(path, contract)
        self.upstream[ref] = Upstream(info.uri, info.content_hash)
        return table

    def write(self, name: str, data: pa.Table | list[Any], contract: type[Row]) -> Path:
        """Validate and write `<run_dir>/<stage>/<name>.parquet` with lineage, and record it in the catalog."""
        path = self.stage_dir / f"{name}.parquet"
        lineage = Lineage(
            stage=self.stage,
            run_id=self.run_id,
            config_hash=self.config_hash,
            code_version=self.code_version,
            upstream=[*self.inputs, *self.upstream.values()],
        )
        info = write_artifact(path, data, contract, lineage)
        catalog.record(self.run_dir, info)
        self.outputs[name] = info
        self.log.info("wrote %s (%d rows, %s)", path, info.rows, contract.contract)
        return path

    def path(self, name: str) -> Path:
        """A path under this stage's folder for outputs that are not Parquet (plots, checkpoints, adapters)."""
        path = self.stage_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def progress(
        self, iterable: Iterable[T], total: int | None = None, desc: str | None = None
    ) -> Iterator[T]:
        return iter(tqdm(iterable, total=total, desc=desc or self.stage, mininterval=1.0, dynamic_ncols=True))


def make_test_context(run_dir: Path, config: Any = None, stage: str = "test") -> StageContext:
    """A context for calling a stage's `run` directly in tests, without the pipeline runner or Prefect."""
    if config is None:
        from tasks.config import load_config

        config = load_config(None)
    return StageContext(
        run_dir=Path(run_dir), stage=stage, config=config, log=logging.getLogger(f"ecamp.{stage}")
    )
