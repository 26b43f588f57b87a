"""The range a seed setting may take.

numpy's generators refuse negative seeds and torch's refuse ones past 64 bits, but only when a stage first
seeds them, minutes into a run and with a message that names no setting. Bounding every seed setting to
[0, 2**32 - 1] makes a bad one a config error naming its key, at load.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

SEED_MAX = 2**32 - 1

Seed = Annotated[int, Field(ge=0, le=SEED_MAX, description="a seed in [0, 2**32 - 1]")]
