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
