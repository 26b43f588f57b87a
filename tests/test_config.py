"""Config loading: YAML sections, dotted overrides, unknown keys and wrong types are errors, stable hashes."""

from __future__ import annotations

import re
import shlex
from datetime import date
from pathlib import Path

import pytest

from models.distill.teacher_http import ClientConfig
from tasks.config import MAX_CONFIG_BYTES, ConfigError, config_from_dict, load_config, section_hash
from tasks.registry import get_stage, stage_names

from .conftest import REPO_ROOT


def test_demo_and_paper_configs_load_with_a_section_per_stage():
    import yaml

    for name in ("demo", "paper"):
        path = REPO_ROOT / "configs" / f"{name}.yaml"
        cfg, raw = load_config(path), yaml.safe_load(path.read_text())
        for stage in stage_names():
            assert isinstance(getattr(cfg, stage), get_stage(stage).config), (name, stage)
            assert stage in raw, (
                f"{name}.yaml has no {stage} section"
            )  # every stage is configured in the file
    demo = load_config(REPO_ROOT / "configs" / "demo.yaml")
    assert demo.data.source == "mimic" and demo.run.run_dir == "runs/demo"
    assert demo.pretrain_ecamp.model.img_size == 64 and load_config(None).pretrain_ecamp.model.img_size == 224


def test_overrides_parse_yaml_values_and_nest():
    cfg = load_config(None, ["data.views=[PA]", "run.seed=5", "data.max_studies=10", "data.source=manifest"])
    assert cfg.data.views == ["PA"] and cfg.run.seed == 5 and cfg.data.max_studies == 10
    assert cfg.data.source == "manifest"


def test_unknown_key_is_an_error_naming_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sourse: mimic\n")
    with pytest.raises(ConfigError, match=r"c.yaml: data.sourse: unknown key"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"<defaults>: nosuchsection: unknown key"):
        load_config(None, ["nosuchsection.x=1"])


def test_wrong_type_is_an_error_with_the_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  seed: many\n")
    with pytest.raises(ConfigError, match=r"run.seed: .*integer.*'many'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"data.source: .*'mimic' or 'manifest'"):
        load_config(None, ["data.source=dicomweb"])


def test_bad_files_and_overrides_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["run.seed"])


def test_section_hash_is_stable_and_only_moves_with_its_section():
    a = load_config(None)
    b = load_config(None, ["run.seed=1"])
    c = load_config(None, ["data.views=[PA]"])
    assert section_hash(a, "data") == section_hash(b, "data") == section_hash(load_config(None), "data")
    assert section_hash(a, "data") != section_hash(c, "data")
    assert len(section_hash(a, "data")) == 16


def test_a_section_given_twice_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  seed: 1\ndata:\n  root: x\nrun:\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"key 'run' given twice \(lines 1 and 5\)"):
        load_config(path)


def test_a_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match=r"is a directory, not a config file"):
        load_config(tmp_path)


def test_an_endless_file_is_refused_after_reading_a_bounded_prefix():
    """`-c /dev/zero` used to read until the process was killed: now at most 1 MiB + 1 byte is read."""
    with pytest.raises(ConfigError, match=r"^/dev/zero: larger than 1 MiB, not a pipeline config$"):
        load_config("/dev/zero")


def test_an_oversized_or_binary_file_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=r"big.yaml: larger than 1 MiB"):
        load_config(big)
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"PK\x03\x04\xff\xfe")
    with pytest.raises(ConfigError, match=r"model.pt: not UTF-8 text \(byte 4\)"):
        load_config(binary)


def test_an_empty_run_dir_is_an_error_not_the_working_directory():
    with pytest.raises(ConfigError, match=r"<defaults>: run.run_dir: .*is empty; name a run directory"):
        load_config(None, ["run.run_dir="])
    with pytest.raises(ConfigError, match=r"run.run_dir: .*is empty"):
        load_config(None, ["run.run_dir='  '"])
    assert load_config(None, ["run.run_dir=."]).run.run_dir == "."  # explicit is fine


def documented_commands(doc: Path) -> list[list[str]]:
    """The `ecamp ...` command lines of a markdown file's bash blocks, continuation lines joined, split by
    shlex."""
    blocks = re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip().startswith("ecamp ")]


def config_and_overrides(argv: list[str]) -> tuple[str, list[str]]:
    """The `-c` file and the `--set` values of an `ecamp` command line."""
    config, overrides = "", []
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag in ("-c", "--config"):
            config = value
        elif flag == "--set":
            overrides.append(value)
    return config, overrides


def test_the_documented_distillation_commands_load():
    """docs/distillation.md's commands are what users paste: each must pass config validation as written.

    The Azure one used to fail: YAML reads `azure_api_version=2024-10-21` as a date, not a string.
    """
    commands = documented_commands(REPO_ROOT / "docs" / "distillation.md")
    azure = [c for c in commands if "seed_distill.provider=azure" in c]
    assert len(commands) >= 5 and len(azure) == 1, commands
    for argv in commands:
        config, overrides = config_and_overrides(argv)
        assert load_config(REPO_ROOT / config, overrides).seed_distill is not None, argv
    config, overrides = config_and_overrides(azure[0])
    assert "seed_distill.azure_api_version=2024-10-21" in overrides  # the docs' exact text, unquoted
    seed = load_config(REPO_ROOT / config, overrides).seed_distill
    assert (seed.provider, seed.azure_api_version) == ("azure", "2024-10-21")
    assert seed.azure_endpoint == "https://my-resource.openai.azure.com"
    assert seed.external_endpoint_ack == "zero-retention verified"
    assert seed.client_config().azure_api_version == "2024-10-21"
    assert ClientConfig(azure_api_version=date(2024, 10, 21)).azure_api_version == "2024-10-21"


def test_a_setting_two_stages_use_exists_once_and_the_reader_fingerprints_just_that_key():
    from tasks.runner import stage_fingerprint

    demo = REPO_ROOT / "configs" / "demo.yaml"
    for key in ("match_entities.matcher.beta=3", "train_gloria.grid=14", "train_gloria.window_k=3"):
        with pytest.raises(ConfigError, match=re.escape(key.split("=")[0]) + ": unknown key"):
            load_config(demo, [key])
    with pytest.raises(
        ConfigError,
        match="model.max_len 64 differs from text.max_len 96: .*set pretrain_ecamp.text.max_len only",
    ):
        load_config(demo, ["pretrain_ecamp.model.max_len=64"])
    longer = load_config(demo, ["pretrain_ecamp.text.max_len=128"])
    assert longer.pretrain_ecamp.model.max_len == 128
    assert config_from_dict(longer.model_dump(mode="json")) == longer  # what the flows pass on loads back

    def fingerprint(stage: str, *overrides: str) -> str:
        return stage_fingerprint(get_stage(stage), load_config(demo, list(overrides)), {}, [])[0]

    gloria, entities = fingerprint("train_gloria"), fingerprint("match_entities")
    assert fingerprint("train_gloria", "pretrain_ecamp.model.sr_window=3") != gloria
    assert (
        fingerprint("train_gloria", "pretrain_ecamp.model.patch_size=16", "pretrain_ecamp.model.sr_window=4")
        != gloria
    )
    assert (
        fingerprint("train_gloria", "pretrain_ecamp.train.epochs=1", "pretrain_ecamp.text.beta=3") == gloria
    )
    assert fingerprint("match_entities", "pretrain_ecamp.text.beta=3") != entities
    assert fingerprint("match_entities", "pretrain_ecamp.model.sr_window=3") == entities


def test_stage_configs_nest_their_domain_configs_instead_of_copying_fields():
    """One definition per setting: a stage's own keys never repeat a key of a domain config it nests."""
    from pydantic import BaseModel

    from tasks.registry import stages

    for stage in stages():
        fields = stage.config.model_fields
        nested = {
            name: f.annotation
            for name, f in fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
        }
        for name, model in nested.items():
            if model.__module__.startswith("models."):
                shadowed = set(fields) & set(model.model_fields)
                assert not shadowed, f"{stage.name}.{shadowed} re-declares {model.__name__} ({name}.*)"
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml")
    assert cfg.train_gloria.model.encoder == "small" and cfg.train_gloria.train.local_words == "affirmed"
    assert cfg.finetune_student.lora.r == 64 and cfg.finetune_student.generation.max_prompt == 136
    with pytest.raises(ConfigError, match=r"finetune_student.lora.rank: unknown key"):
        load_config(None, ["finetune_student.lora.rank=8"])
    with pytest.raises(ConfigError, match=r"train_gloria.epochs: unknown key"):
        load_config(None, ["train_gloria.epochs=3"])


def test_the_paper_config_pre_trains_on_every_view():
    from models.resources import CONFIG_DIR
    from tasks.config import DataConfig

    assert DataConfig().views == []  # [] = all ViewPositions (§4.1: frontal, back and lateral)
    assert load_config(CONFIG_DIR / "paper.yaml").data.views == []
    assert load_config(CONFIG_DIR / "demo.yaml").data.views == ["PA", "AP"]


def test_a_profile_extends_the_paper_config_changing_only_what_it_names(tmp_path):
    from models.resources import CONFIG_DIR

    paper = load_config(CONFIG_DIR / "paper.yaml")
    literal = load_config(CONFIG_DIR / "profiles" / "paper-literal-depth.yaml")
    assert paper.pretrain_ecamp.model.depth == 12 and literal.pretrain_ecamp.model.depth == 8
    assert literal.pretrain_ecamp.model.model_copy(update={"depth": 12}) == paper.pretrain_ecamp.model
    assert literal.model_dump(exclude={"pretrain_ecamp"}) == paper.model_dump(exclude={"pretrain_ecamp"})
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml: extends itself through .*a.yaml -> .*b.yaml"):
        load_config(tmp_path / "a.yaml")


def test_every_client_setting_the_distillation_doc_names_can_be_set_and_reaches_the_client():
    doc = (REPO_ROOT / "docs" / "distillation.md").read_text()
    assert "`max_retry_after_s`" in doc
    seed = load_config(
        REPO_ROOT / "configs" / "paper.yaml", ["seed_distill.max_retry_after_s=30"]
    ).seed_distill
    assert seed.client_config().max_retry_after_s == 30.0
    names = set(re.findall(r"`([a-z_]+)`", doc)) & set(ClientConfig.model_fields)
    missing = sorted(n for n in names if n not in type(seed).model_fields and n != "temperature")
    assert not missing, f"docs/distillation.md names client settings seed_distill does not take: {missing}"
