"""Pipeline configuration: pydantic models loaded from YAML, `--set a.b=c` overrides, stable section hashes.

The top-level model is assembled from the registered stages: each stage module owns its section's model, so
a stage that has not landed has no section, and an unknown key anywhere is an error rather than ignored.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from models.seeds import Seed
from tasks.base import StageConfig, setting
from tasks.registry import stages

MAX_CONFIG_BYTES = 1 << 20  # a pipeline config is a few KiB; more is the wrong file (or /dev/zero)


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file, the key and the problem."""


class RunConfig(StageConfig):
    seed: Seed = 0
    run_dir: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(  # bounded: 100,000 threads exhaust memory and hang the command
        None, ge=1, le=1024, description="torch threads on CPU; None keeps torch's default"
    )
    gpu_pool: str | None = Field(
        None,
        description="work pool of the GPU worker: the pipeline hands its GPU stages to `gpu_deployment` "
        "there and waits; None runs every stage in the pipeline's own process",
    )
    gpu_deployment: str = Field(
        "ecamp-stage/stage-gpu",
        description="the deployment (flow/name) GPU stages run as when gpu_pool is set",
    )
    gpu_pickup_timeout_s: float = Field(
        600.0, gt=0, description="how long a GPU stage run may wait for a worker before the pipeline fails"
    )

    @field_validator("run_dir")
    @classmethod
    def _run_dir_named(cls, value: str) -> str:
        """An empty run_dir would make every stage write into the working directory."""
        if not value.strip():
            raise ValueError("is empty; name a run directory (e.g. runs/default, or . on purpose)")
        return value


class DataConfig(StageConfig):
    source: Literal["mimic", "manifest"] = "mimic"
    root: str | None = Field(
        None, description="MIMIC-CXR root holding files/ and the mimic-cxr-2.0.0-*.csv.gz"
    )
    manifest: str | None = Field(None, description="CSV/Parquet with study_id, image_path, report_text")
    views: list[str] = Field(
        default_factory=list,
        description="ViewPosition values kept; [] = all (the paper pre-trains on frontal and lateral views, "
        "§4.1)",
    )
    check_images: bool = Field(False, description="decode every image at extraction (slow at MIMIC scale)")
    max_studies: int | None = Field(None, ge=1, description="keep only the first N studies (quick trials)")
    generate: bool = Field(
        False,
        description="data.root is the demo generator's corpus: made from the synth section when absent",
    )


@cache
def pipeline_config_model() -> type[BaseModel]:
    """The PipelineConfig model: run, data, synth and one section per registered stage."""
    from models.synth.corpus import SynthConfig

    sections: dict[str, Any] = {
        "run": (RunConfig, Field(default_factory=RunConfig)),
        "data": (DataConfig, Field(default_factory=DataConfig)),
        "synth": (SynthConfig, Field(default_factory=SynthConfig)),
    }
    for stage in stages():
        sections[stage.name] = (stage.config, Field(default_factory=stage.config))
    return create_model("PipelineConfig", __config__=ConfigDict(extra="forbid"), **sections)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key '{key}' given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}': expected key.path=value")
    return key.strip().split("."), parse_yaml(raw, f"override '{key.strip()}'") if raw.strip() else ""


def parse_yaml(text: str, source: str, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """YAML text as Python values; invalid or absurdly nested YAML (the parser recurses once per level, so a
    few hundred `[` exhaust Python's stack) is a ConfigError naming `source`."""
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({err})") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a pipeline config") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a raw config mapping; values are parsed as YAML (`3`, `true`, `[PA, AP]`)."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = raw
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{k}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return raw


def _explain(err: ValidationError, source: str) -> ConfigError:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: {loc}: unknown key")
        else:
            lines.append(f"{source}: {loc}: {e['msg']} (got {e.get('input')!r})")
    return ConfigError("\n".join(lines))


def read_config_text(path: Path) -> str:
    """The file's text, reading at most MAX_CONFIG_BYTES + 1 bytes so that a device or a huge file fails
    fast."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB, not a pipeline config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> BaseModel:
    """Load a YAML config (or the defaults when `path` is None) and apply `--set` overrides.

    A config may start from another with `extends: <path relative to it>` (a named profile: the paper config
    with one choice changed); its sections are merged key by key over the base's.
    """
    source = str(path) if path else "<defaults>"
    raw = read_raw(Path(path)) if path else {}
    return config_from_dict(apply_overrides(raw, list(overrides or [])), source)


def read_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One YAML file as a mapping, with its `extends` chain merged in (a cycle is an error naming it)."""
    source = str(path)
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError) as err:  # Python 3.11 reports a symlink loop as RuntimeError
        raise ConfigError(f"{source}: cannot resolve the path ({err})") from None
    if resolved in seen:
        raise ConfigError(f"{source}: extends itself through {' -> '.join(map(str, seen))}")
    raw = parse_yaml(read_config_text(path), source, _UniqueKeyLoader) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{source}: extends must be a path to another config, got {base!r}")
    return merged(read_raw(path.parent / base, (*seen, resolved)), raw)


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> BaseModel:
    """Validate a raw config mapping; errors name `source`."""
    try:
        config = pipeline_config_model().model_validate(data)
    except ValidationError as err:
        raise _explain(err, source) from None
    return config


def stable_hash(value: Any) -> str:
    """Hash of a JSON-able value with sorted keys: equal configs hash equal across runs and machines."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def section_hash(config: BaseModel, key: str) -> str:
    """Hash of a section, or of one setting by its dotted key (a stage reading another stage's setting)."""
    value = setting(config, key)
    return stable_hash(value.model_dump(mode="json") if isinstance(value, BaseModel) else value)
