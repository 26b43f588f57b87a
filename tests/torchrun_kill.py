"""`python -m models.ecamp.job` under torchrun, with one rank killed by SIGKILL part-way through a step.

Rank $KILL_RANK kills itself in optimiser step $KILL_STEP, after its backward pass and before the step's loss
all-reduce: a node lost mid-epoch, in `tests/test_distributed.py`. Only the killed run uses this entry point;
the rerun that resumes is the plain `models.ecamp.job`.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from models.ecamp import job, pretrain
from models.engine.distributed import DistInfo


def main() -> None:
    kill_rank, kill_step = int(os.environ["KILL_RANK"]), int(os.environ["KILL_STEP"])
    all_reduce = pretrain.mean_over_ranks  # called once per optimiser step, by every rank
    steps = 0

    def mean_over_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
        nonlocal steps
        steps += 1
        if info.rank == kill_rank and steps == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return all_reduce(values, info)

    pretrain.mean_over_ranks = mean_over_ranks
    job.main(sys.argv[1:])


if __name__ == "__main__":
    main()
