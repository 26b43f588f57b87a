"""What a stage sees: its config section type and the context through which it reads and writes artifacts.

Stages never build paths to other stages' files or write Parquet themselves: going through the context is
what makes every output validated, atomic and traceable to the exact upstream versions it was made from.

An attempt writes into `<stage>/.attempt/`; only `commit` moves its outputs under their final names and
then writes the success record. A failed attempt therefore leaves the previous good outputs and record in
place, and its partial outputs apart where a user can inspect them. Working files that must survive a
failed attempt (caches, checkpoints, shards) go to `scratch`.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from data_contracts import catalog, files
from data_contracts.base import Row, contract_by_name
from data_contracts.io import (
    ArtifactInfo,
    Lineage,
    Upstream,
    content_hash,
    read_artifact_and_info,
    write_artifact,
)
from tasks.lock import in_the_way
from tasks.record import (
    OutputRecord,
    SuccessRecord,
    current_hash,
    output_path,
    read_record,
    record_path,
    write_record,
)
from tasks.stage import Stage, split_ref

T = TypeVar("T")
ATTEMPT_DIR = ".attempt"
FILE_SCHEMA = "file"  # the schema name of file outputs (weights, adapters) in the catalog and manifests
PREVIOUS_DIR = ".previous"


class StageConfig(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class MissingUpstreamError(FileNotFoundError):
    """An upstream artifact a stage needs has not been produced (successfully) in this run directory."""


class UndeclaredError(KeyError):
    """A stage read, wrote or configured itself from something its `Stage` record does not declare."""

    def __str__(self) -> str:
        return str(self.args[0])


def setting(config: Any, key: str) -> Any:
    """The value at a dotted key (`pretrain_ecamp.model.grid_size`; a section is a key too)."""
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


class ConfigView:
    """The pipeline config as a stage may see it: `run`, its own section and the sections it declares, and the
    single settings of other stages it declares by dotted key (read with `setting`)."""

    def __init__(self, config: Any, allowed: Iterable[str], stage: str):
        self._config, self._allowed, self._stage = config, frozenset(allowed), stage

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in self._allowed:
            return getattr(self._config, name)
        raise UndeclaredError(
            f"stage '{self._stage}' reads config section '{name}' without declaring it in its Stage.sections"
        )

    def setting(self, key: str) -> Any:
        """One setting by dotted key, e.g. `pretrain_ecamp.model.grid_size`: declared itself or in a
        section."""
        if key in self._allowed or key.split(".", 1)[0] in self._allowed:
            return setting(self._config, key)
        raise UndeclaredError(
            f"stage '{self._stage}' reads setting '{key}' without declaring it in its Stage.sections"
        )


@dataclass
class StageContext:
    run_dir: Path
    stage: Stage
    config: Any
    log: logging.Logger | logging.LoggerAdapter
    name: str = ""  # folder name: the stage's own, or an ablation row's `pretrain_ecamp__<row>`
    run_id: str = "local"
    config_hash: str = ""
    inputs: list[Upstream] = field(default_factory=list)
    input_stamps: dict[str, str] = field(default_factory=dict)  # path -> stamp of every input file read
    outputs: dict[str, ArtifactInfo] = field(default_factory=dict)
    upstream: dict[str, Upstream] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.name = self.name or self.stage.name
        if not isinstance(self.config, ConfigView):
            allowed = {"run", self.stage.name, *self.stage.sections}
            self.config = ConfigView(self.config, allowed, self.name)

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.name

    @property
    def attempt_dir(self) -> Path:
        return self.stage_dir / ATTEMPT_DIR

    @property
    def code_version(self) -> str:
        return self.stage.code_version

    # -- reading ----------------------------------------------------------------------------------------

    def _declared_read(self, ref: str) -> tuple[str, str]:
        if ref not in self.stage.reads:
            raise UndeclaredError(
                f"stage '{self.name}' reads '{ref}' without declaring it in its Stage.reads"
            )
        return split_ref(ref)

    def _upstream(self, ref: str) -> tuple[Path, OutputRecord] | None:
        producer, name = self._declared_read(ref)
        record = read_record(self.run_dir, producer)
        if record is None or name not in record.outputs:
            return None
        rec = record.outputs[name]
        return output_path(self.run_dir, producer, name, rec.kind), rec

    def has(self, ref: str) -> bool:
        """True when the producing stage's last success lists `ref` (outputs of failed attempts never
        count)."""
        found = self._upstream(ref)
        return found is not None and found[0].exists()

    def _missing(self, ref: str) -> MissingUpstreamError:
        producer, _ = split_ref(ref)
        return MissingUpstreamError(
            f"{self.name} needs '{ref}' but stage '{producer}' has no successful run in {self.run_dir} "
            f"that wrote it: run stage '{producer}' first"
        )

    def read(self, ref: str, contract: type[Row] | None = None) -> pa.Table:
        """Read and validate an upstream Parquet artifact, recording the hash of what was read. The contract
        is the one its success record lists, so a file swapped for another output of its stage is refused
        naming both contracts, instead of failing later on a missing column."""
        found = self._upstream(ref)
        if found is None:
            raise self._missing(ref)
        path, rec = found
        if contract is None and rec.info is not None:
            contract = contract_by_name(rec.info.schema_name)
        table, info = read_artifact_and_info(path, contract)
        actual = rec.content_hash if files.stamp(path) == rec.stamp else content_hash(table)
        written_here = rec.info is None or (info.uri, info.content_hash) == (rec.info.uri, rec.content_hash)
        if not written_here:
            self.log.warning(
                "%s is a copy of %s (run %s), not the file its stage wrote here: lineage records it as "
                "read from %s with the hash of its content",
                path,
                info.uri,
                info.run_id,
                path,
            )
        elif actual != rec.content_hash:
            self.log.warning("%s changed after its stage wrote it: recording the hash of what was read", path)
        # The path read, not the one in the file's metadata: a file copied in from another run directory
        # names that run's path there, and the lineage would point at a file this stage never opened.
        self.upstream[ref] = Upstream(path.resolve().as_uri(), actual)
        return table

    def read_path(self, ref: str) -> Path:
        """The path of an upstream file output (weights, adapter folder), checked against its success
        record."""
        found = self._upstream(ref)
        if found is None:
            raise self._missing(ref)
        path, rec = found
        producer, name = split_ref(ref)
        actual = current_hash(self.run_dir, producer, name, rec)
        if actual is None:
            raise self._missing(ref)
        self.upstream[ref] = Upstream(path.resolve().as_uri(), actual)
        return path

    # -- writing ----------------------------------------------------------------------------------------

    def begin(self) -> None:
        """Start an attempt: a clean `.attempt/` folder (a previous failed attempt's partial outputs go).

        A success record path that `commit` could not write (a folder named `_stage.json`) is refused here,
        before the stage runs: found at commit, the outputs would already have been replaced."""
        record = record_path(self.run_dir, self.name)
        if record.is_dir():
            raise in_the_way(record, "the stage's success record")
        if self.stage_dir.exists() and not self.stage_dir.is_dir():
            raise in_the_way(self.stage_dir, "the stage's folder", found="a file")
        if self.attempt_dir.is_symlink() or (self.attempt_dir.exists() and not self.attempt_dir.is_dir()):
            # a link would put the attempt's outputs wherever it points, outside the run directory
            raise in_the_way(self.attempt_dir, "the stage's attempt folder", found="a file or a link")
        shutil.rmtree(self.attempt_dir, ignore_errors=True)
        self.attempt_dir.mkdir(parents=True)

    def lineage(self) -> Lineage:
        """What an output written now is made from: this stage, run, config, code and everything read so
        far."""
        return Lineage(
            stage=self.name,
            run_id=self.run_id,
            config_hash=self.config_hash,
            code_version=self.code_version,
            upstream=[*self.inputs, *self.upstream.values()],
        )

    def write(self, name: str, data: pa.Table | list[Any], contract: type[Row] | None = None) -> Path:
        """Validate and write the declared Parquet output `name` into the attempt, with lineage."""
        declared = self.stage.writes.get(name)
        if declared is None:
            raise UndeclaredError(f"stage '{self.name}' writes '{name}' without declaring it in Stage.writes")
        if contract is not None and contract is not declared:
            raise UndeclaredError(f"stage '{self.name}': '{name}' is declared as {declared.contract}")
        final = output_path(self.run_dir, self.name, name, "parquet")
        path = self.attempt_dir / final.name
        info = write_artifact(path, data, declared, self.lineage(), uri=final.resolve().as_uri())
        self.outputs[name] = info
        self.log.info("wrote %s (%d rows, %s)", final.name, info.rows, declared.contract)
        return path

    def path(self, name: str) -> Path:
        """Where to write a declared file output (weights, adapter folder, plots) during this attempt."""
        head = Path(name).parts[0]
        if head not in self.stage.files:
            raise UndeclaredError(f"stage '{self.name}' writes file '{name}' not declared in Stage.files")
        path = self.attempt_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def scratch(self, name: str) -> Path:
        """A working file kept across attempts (response caches, checkpoints, shards, logs); not an output,
        so never moved or verified. It lives in the stage folder, beside the outputs."""
        if Path(name).parts[0] in (*self.stage.outputs, ATTEMPT_DIR, PREVIOUS_DIR):
            raise UndeclaredError(f"stage '{self.name}': scratch name '{name}' is an output's name")
        path = self.stage_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, fingerprint: str, parts: dict[str, Any], seconds: float) -> SuccessRecord:
        """Move every declared output of the attempt under its final name, then write the success record."""
        missing = [n for n in self.stage.writes if n not in self.outputs]
        missing += [
            n
            for n in self.stage.files
            if not (self.attempt_dir / n).exists() and n not in self.stage.optional
        ]
        if missing:
            raise RuntimeError(f"stage '{self.name}' finished without writing its declared outputs {missing}")
        previous = self.stage_dir / PREVIOUS_DIR
        shutil.rmtree(previous, ignore_errors=True)
        previous.mkdir()
        record = SuccessRecord(self.name, fingerprint, parts, seconds)
        for name in self.stage.outputs:
            kind = "parquet" if name in self.stage.writes else "file"
            final = output_path(self.run_dir, self.name, name, kind)
            staged = self.attempt_dir / final.name
            if final.exists():
                final.rename(previous / final.name)
            if not staged.exists():  # an optional file output this configuration does not write
                continue
            staged.rename(final)
            if kind == "parquet":
                info = self.outputs[name]
                record.outputs[name] = OutputRecord(kind, info.content_hash, files.stamp(final), info)
            else:
                info = self.file_info(name, final)
                record.outputs[name] = OutputRecord(kind, info.content_hash, files.stamp(final), info)
        write_record(self.run_dir, record)
        for rec in record.outputs.values():
            catalog.record(self.run_dir, rec.info, self.log)
        shutil.rmtree(previous, ignore_errors=True)
        shutil.rmtree(self.attempt_dir, ignore_errors=True)
        return record

    def file_info(self, name: str, path: Path) -> ArtifactInfo:
        """A file output's lineage (weights, adapter, tokenizer), like a Parquet output's: it is made from
        everything the stage read, so `ecamp lineage pretrain_ecamp/encoder` and the manifests can follow
        it."""
        return ArtifactInfo(
            uri=path.resolve().as_uri(),
            name=name,
            schema_name=FILE_SCHEMA,
            schema_version=0,
            rows=0,
            content_hash=files.content_hash(path),
            stage=self.name,
            run_id=self.run_id,
            config_hash=self.config_hash,
            code_version=self.code_version,
            upstream=[*self.inputs, *self.upstream.values()],
            created_at=time.time(),
        )

    def lineage_facts(self) -> dict[str, Any]:
        """Where a model file comes from, for its header and model card: run, config, code and the exact
        hashes of what the stage read so far."""
        return {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir.resolve()),
            "stage": self.name,
            "config_hash": self.config_hash,
            "code_version": self.code_version,
            "upstream": {ref: u.content_hash for ref, u in sorted(self.upstream.items())},
            "inputs": {u.uri: u.content_hash for u in self.inputs},
        }

    def every(self, seconds: float = 10.0) -> Callable[[], bool]:
        """A gate for per-step log lines: true at the first call, then at most once per `seconds` (the full
        curves are artifacts; the run log stays readable)."""
        last = [-math.inf]

        def due() -> bool:
            now = time.monotonic()
            if now - last[0] < seconds:
                return False
            last[0] = now
            return True

        return due

    def progress(
        self, iterable: Iterable[T], total: int | None = None, desc: str | None = None
    ) -> Iterator[T]:
        return iter(tqdm(iterable, total=total, desc=desc or self.name, mininterval=1.0, dynamic_ncols=True))
