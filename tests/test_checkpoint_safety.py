"""Loading a torch file never runs code (issue 26, points 1–2).

A pickle may name any callable: `Evil.__reduce__` below makes `torch.load(..., weights_only=False)` call
`os.system`, which would create the side-effect file. Each place that reads a torch file gets such a file: the
MAE `init_checkpoint` of pre-training, `ecamp evaluate --init`, the resume checkpoints of both trainers and
the read-back of a torchrun pre-training. The side-effect file must never appear, and the error must name the
file, the refused global and what to do.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from models.checkpoints import CheckpointError, load_torch_file, read_state_dict
from models.ecamp.data import PretrainDataset
from models.ecamp.model import ECAMP, ECAMPConfig
from models.ecamp.pretrain import CHECKPOINT, load_partial, read_resume_checkpoint, train
from models.evaluate.encoders import downstream_vit, load_init
from models.gloria.model import Gloria
from models.gloria.train import ImageTextData, TrainConfig, train_gloria
from models.resources import REPO_ROOT
from models.text.wordpiece import train_wordpiece
from tests.real_data import iu_xray_texts
from tests.test_gloria import TEXTS as GLORIA_TEXTS
from tests.test_gloria import TINY as TINY_GLORIA
from tests.test_gloria import synthetic_pairs
from tests.test_pretrain import DISTILLED, MODEL, collator, model_cfg, records, tiny_train_cfg


@dataclasses.dataclass
class Pretraining:
    """A tiny pre-training set: radiograph-like PNGs, real IU X-ray reports and a WordPiece tokenizer."""

    images: list[str]
    reports: list[str]
    tokenizer: object

    def dataset(self, cfg):
        return PretrainDataset(records(self.images, self.reports), model_cfg(self.tokenizer), cfg)


@pytest.fixture(scope="module")
def pre(tmp_path_factory) -> Pretraining:
    reports = [r for r in iu_xray_texts() if len(r) > 40][:40]
    root, rng, images = tmp_path_factory.mktemp("imgs"), np.random.default_rng(0), []
    for i in range(16):
        img = np.tile(np.linspace(30, 150, 40), (48, 1)) + rng.normal(0, 5, (48, 40))
        images.append(str(root / f"im{i}.png"))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(images[-1])
    tokenizer = train_wordpiece(reports + [DISTILLED], vocab_size=400, min_frequency=1)
    return Pretraining(images, reports, tokenizer)


class Evil:
    """What a hostile `.pth` holds: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def evil_file(path, marker, payload=None):
    torch.save({**(payload or {"model": {"w": torch.zeros(2)}}), "x": Evil(marker)}, path)
    return path


def assert_refused(err: CheckpointError, path) -> None:
    message = str(err)
    assert message.startswith(f"{path}: refused to load: it needs the Python global 'posix.system'")
    assert "could run code on this machine" in message and "\n" not in message


def test_the_malicious_file_really_runs_code_without_the_guard(tmp_path):
    """The fixture is what the issue describes: a plain torch.load of it runs the command."""
    marker = tmp_path / "pwned"
    torch.load(evil_file(tmp_path / "evil.pth", marker), weights_only=False)
    assert marker.exists()


def test_an_init_checkpoint_that_would_run_code_is_refused(tmp_path, pre):
    marker = tmp_path / "pwned"
    path = evil_file(tmp_path / "evil.pth", marker)
    with pytest.raises(CheckpointError) as raised:
        load_partial(ECAMP(ECAMPConfig(**{**MODEL, "vocab_size": 50})), path)
    assert_refused(raised.value, path)
    assert "convert it once to safetensors" in str(raised.value) and "weights_only=False" not in str(
        raised.value
    )
    cfg, mcfg = tiny_train_cfg(init_checkpoint=str(path)), model_cfg(pre.tokenizer)
    with pytest.raises(CheckpointError, match="refused to load"):
        train(mcfg, cfg, pre.dataset(cfg), collator(pre.tokenizer), tmp_path / "train", progress=False)
    assert not marker.exists()


def test_the_conversion_command_in_the_message_makes_a_file_that_loads(tmp_path):
    """The one-liner the error offers turns an MAE-style file with an unknown global (a PosixPath) into
    safetensors with the same tensors, reading it as data."""
    state = {"blocks.0.attn.qkv.weight": torch.randn(6, 2), "pos_embed": torch.randn(1, 3, 2)}
    torch.save(
        {"model": state, "args": argparse.Namespace(lr=1.5e-4), "epoch": torch.tensor(3)},
        tmp_path / "trusted.pth",
    )
    torch.save({"model": state, "output_dir": pathlib.PosixPath("/data/mae")}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as raised:
        read_state_dict(tmp_path / "other.pth")
    command = str(raised.value).split("use that file instead: ", 1)[1]
    assert command.startswith("python -m models.checkpoints convert ")
    command = command.replace("python", shlex.quote(sys.executable), 1)
    subprocess.run(
        command, shell=True, check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    )
    converted = read_state_dict(tmp_path / "other.safetensors")
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)


def test_the_conversion_reads_as_data_and_refuses_a_file_that_calls_code(tmp_path):
    """The converter never unpickles freely: globals torch does not know become inert stand-ins, and a file
    that calls os.system stays refused, its command never run."""
    from models.checkpoints import convert_to_safetensors, main

    marker = tmp_path / "pwned"
    evil = evil_file(tmp_path / "evil.pth", marker)
    with pytest.raises(CheckpointError) as raised:
        convert_to_safetensors(evil, tmp_path / "evil.safetensors")
    assert (
        str(raised.value)
        == f"{evil}: cannot be converted: it calls 'posix.system', which runs code; do not use this file"
    )
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()
    with pytest.raises(SystemExit, match="cannot be converted"):
        main(["convert", str(evil)])
    assert not marker.exists()


def test_evaluate_init_that_would_run_code_is_one_line_before_any_flow(tmp_path):
    marker = tmp_path / "pwned"
    path = evil_file(tmp_path / "evil.pth", marker)
    with pytest.raises(CheckpointError) as raised:
        load_init(
            downstream_vit({"img_size": 32, "patch_size": 16, "embed_dim": 8, "depth": 1, "num_heads": 2}),
            path,
        )
    assert_refused(raised.value, path)
    data = tmp_path / "downstream"
    data.mkdir()
    one_set = f"evaluate.datasets=[{{name: d, kind: synth, task: segmentation, path: {data}}}]"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "-c",
            "configs/demo.yaml",
            "--run-dir",
            str(tmp_path / "run"),
            "--set",
            "evaluate.synth=null",
            "--set",
            one_set,
            "--init",
            str(path),
        ],
    )
    assert result.exit_code == 2
    assert result.output.startswith(
        f"error: {path}: refused to load: it needs the Python global 'posix.system'"
    )
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_pretraining_resume_checkpoint_that_would_run_code_is_refused(tmp_path, pre):
    marker = tmp_path / "pwned"
    cfg, mcfg = tiny_train_cfg(epochs=1), model_cfg(pre.tokenizer)
    out = tmp_path / "train"
    out.mkdir()
    evil_file(out / CHECKPOINT, marker)
    data = pre.dataset(cfg)
    with pytest.raises(CheckpointError) as raised:
        train(mcfg, cfg, data, collator(pre.tokenizer), out, progress=False)
    assert_refused(raised.value, out / CHECKPOINT)
    assert str(raised.value).endswith("; delete it to start ECAMP pre-training over")
    with pytest.raises(CheckpointError, match="refused to load"):  # the read-back after a torchrun training
        read_resume_checkpoint(out / CHECKPOINT)
    assert not marker.exists()


def test_a_gloria_resume_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = evil_file(tmp_path / "gloria.pt", marker)
    images, texts = synthetic_pairs(8)
    tokenizer = train_wordpiece(GLORIA_TEXTS * 5, vocab_size=120, min_frequency=1)
    with pytest.raises(CheckpointError) as raised:
        train_gloria(
            Gloria(TINY_GLORIA),
            ImageTextData(images, texts),
            tokenizer,
            TrainConfig(epochs=1, batch_size=8),
            ckpt,
        )
    assert_refused(raised.value, ckpt)
    assert str(raised.value).endswith("; delete it to start GLoRIA training over")
    assert not marker.exists()


def test_our_own_checkpoints_load_with_weights_only_and_resume(tmp_path, pre):
    """Both trainers write tensors and plain types only (the RNG states too), so resuming needs no pickle."""
    cfg, mcfg = tiny_train_cfg(epochs=1), model_cfg(pre.tokenizer)
    out = tmp_path / "train"
    train(mcfg, cfg, pre.dataset(cfg), collator(pre.tokenizer), out, progress=False, stop_after=1)
    payload = torch.load(out / CHECKPOINT, weights_only=True)  # no allow-list at all
    assert payload["state"]["step"] == 1 and isinstance(payload["rng"][0]["numpy"][1], list)


def test_an_official_mae_checkpoint_with_its_args_namespace_loads(tmp_path, caplog):
    cfg = ECAMPConfig(**{**MODEL, "vocab_size": 50})
    donor = ECAMP(cfg)
    mae = {k.removeprefix("encoder."): v for k, v in donor.encoder.state_dict().items()}
    mae |= {k.removeprefix("decoder."): v for k, v in donor.decoder.state_dict().items()}
    args = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True)
    torch.save({"model": mae, "optimizer": {"state": {}}, "epoch": 799, "args": args}, tmp_path / "mae.pth")
    assert load_torch_file(tmp_path / "mae.pth")["args"] == args
    model = ECAMP(cfg)
    with caplog.at_level(logging.INFO):
        loaded, unexpected = load_partial(model, tmp_path / "mae.pth")
    assert len(loaded) == len(mae) and unexpected == []
    assert torch.equal(model.encoder.blocks[0].attn.qkv.weight, donor.encoder.blocks[0].attn.qkv.weight)
    assert [r.levelname for r in caplog.records if "init_checkpoint" in r.message] == ["INFO"]


def test_an_init_checkpoint_matching_nothing_is_an_error_and_a_partial_one_a_warning(tmp_path, caplog):
    cfg = ECAMPConfig(**{**MODEL, "vocab_size": 50})
    torch.save({"model": {"fc.weight": torch.zeros(3), "fc.bias": torch.zeros(3)}}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError) as raised:
        load_partial(ECAMP(cfg), tmp_path / "resnet.pth")
    assert str(raised.value) == (
        f"init_checkpoint {tmp_path / 'resnet.pth'}: none of its 2 tensors matches a parameter of the model "
        f"(e.g. fc.weight: no such parameter, fc.bias: no such parameter); it is not an MAE/ECAMP "
        f"pre-training checkpoint"
    )
    donor = ECAMP(cfg).encoder.state_dict()
    half = dict(list(donor.items())[: len(donor) // 2])
    torch.save({"model": half}, tmp_path / "half.pth")
    with caplog.at_level(logging.INFO):
        loaded, _ = load_partial(ECAMP(cfg), tmp_path / "half.pth")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "init_checkpoint" in r.message]
    assert len(loaded) == len(half) and len(warned) == 1
    assert f"loaded {len(half)} tensors" in warned[0].message
    assert f"encoder keys not in it (fresh) {len(donor) - len(half)}" in warned[0].message


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("empty.pth", b"", "not a readable torch file (truncated or another format: empty file)"),
        ("text.pth", b"hello, not weights", "not a readable torch file (truncated or another format: "),
        ("text.safetensors", b"hello, not weights", "not a readable safetensors file ("),
    ],
)
def test_broken_weights_files_are_one_line_naming_the_file(tmp_path, name, content, why):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError) as raised:
        read_state_dict(tmp_path / name)
    assert str(raised.value).startswith(f"{tmp_path / name}: {why}") and "\n" not in str(raised.value)


def test_a_truncated_torch_or_safetensors_file_is_one_line(tmp_path):
    from safetensors.torch import save_file

    torch.save({"model": {"w": torch.zeros(64)}}, tmp_path / "full.pth")
    save_file({"w": torch.zeros(64)}, str(tmp_path / "full.safetensors"))
    for suffix in (".pth", ".safetensors"):
        data = (tmp_path / f"full{suffix}").read_bytes()
        (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=rf"^{tmp_path / f'cut{suffix}'}: not a readable"):
            read_state_dict(tmp_path / f"cut{suffix}")


def test_a_resume_file_of_another_kind_is_refused_with_what_it_lacks(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError) as raised:
        read_resume_checkpoint(tmp_path / CHECKPOINT)
    assert str(raised.value) == (
        f"{tmp_path / CHECKPOINT}: not a resume checkpoint of ECAMP pre-training (no 'optimizer', "
        f"'scheduler', 'state', 'rng', 'fingerprint', 'world'); delete it to start ECAMP pre-training over"
    )


def test_no_torch_load_in_the_code_allows_pickles():
    """Every torch file goes through models.checkpoints.load_torch_file."""
    found = subprocess.run(
        ["grep", "-rn", "--include=*.py", "weights_only=False", "models", "tasks", "flows", "data_contracts"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.stdout == ""
