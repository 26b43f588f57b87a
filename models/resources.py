"""The one place that knows where the repository's own files are (configs, the default entity list)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_ENTITY_LIST = CONFIG_DIR / "entities" / "table1.txt"  # paper Table 1
