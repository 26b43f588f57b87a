"""Test-wide settings: an isolated Prefect home, quiet Prefect, one torch thread, and shared fixtures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_PREFECT_HOME = tempfile.mkdtemp(prefix="ecamp-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = os.path.join(_PREFECT_HOME, "storage")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402

from tests.real_data import REAL_DATA, REPO_ROOT  # noqa: E402, F401  (tests import them from here)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    yield


@pytest.fixture
def console(monkeypatch):
    """What Prefect's console handlers print during the test (they write to the stream they were made with),
    as an io.StringIO: the one-line-error tests read it beside the CLI's own output."""
    import io
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    buffer = io.StringIO()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            monkeypatch.setattr(handler.console, "file", buffer)
    return buffer


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API (temporary SQLite DB + server subprocess) for the flow tests; stopped at the end."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A small generated MIMIC-layout corpus shared by the tests that need one (read-only for them)."""
    from models.synth.corpus import SynthConfig, generate_corpus

    root = tmp_path_factory.mktemp("corpus") / "mimic"
    generate_corpus(SynthConfig(n_studies=40, image_size=128, seed=7), root)
    return root


def tiny_pipeline_config(folder: Path) -> Path:
    """The demo config shrunk so that the whole pipeline (all stages, the three inits) runs in well under a
    minute: a config file under `folder` extending configs/demo.yaml, its corpora generated under `folder`."""
    import yaml

    data = folder / "data"
    config = {
        "extends": str(REPO_ROOT / "configs" / "demo.yaml"),
        "run": {"run_dir": str(folder / "run")},
        "data": {"root": str(data / "mimic"), "generate": True},
        "synth": {"n_studies": 48, "image_size": 64},
        "seed_distill": {"n_reports": 24},
        "finetune_student": {
            "train": {"epochs": 1, "max_len": 256},
            "generation": {"max_new_tokens": 96},
            "base": {
                "dims": {
                    "vocab_size": 400,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                },
            },
            "lora": {"r": 8, "alpha": 16},
            "reprompt_rounds": 0,
        },
        "bulk_distill": {"shard_size": 12},
        "pretrain_ecamp": {
            "model": {
                "img_size": 32,
                "hr_size": 64,
                "patch_size": 8,
                "embed_dim": 32,
                "depth": 1,
                "num_heads": 2,
                "decoder_embed_dim": 32,
                "decoder_depth": 1,
                "decoder_num_heads": 2,
                "sr_window": 2,
                "vocab_size": 400,
                "text_hidden": 32,
                "text_layers": 1,
                "text_heads": 2,
                "text_ffn": 64,
            },
            "text": {"max_len": 48},
            "tokenizer_min_frequency": 1,
            "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "num_workers": 0},
        },
        "train_gloria": {
            "model": {
                "image_size": 32,
                "embed_dim": 16,
                "vocab_size": 300,
                "text_hidden": 16,
                "text_intermediate": 32,
                "max_tokens": 32,
            },
            "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0},
            "word_prior_images": 16,
            "n_pictures": 2,
        },
        "evaluate": {
            "fractions": [100],
            "seeds": [0],
            "synth": {"n_studies": 40, "image_size": 64},
            "datasets": [
                {
                    "name": "demo-cls",
                    "kind": "synth",
                    "task": "classification",
                    "path": str(data / "downstream"),
                }
            ],
            "protocol": {
                "finetune": {
                    "epochs": 1,
                    "batch_size": 16,
                    "min_steps": 2,
                    "warmup_epochs": 0,
                    "validations": 1,
                },
                "linear_probe": {"epochs": 1, "batch_size": 16, "min_steps": 2, "warmup_epochs": 0},
            },
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
