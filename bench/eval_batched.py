"""The evaluate stage's heads trained one by one vs as one group per label fraction, side by side (issue
23.5).

    .venv/bin/python bench/eval_batched.py                         # probe, segmentation, detection at 1 %
    .venv/bin/python bench/eval_batched.py --fraction 10 --protocols detection --repeats 2
    .venv/bin/python bench/eval_batched.py --vmap                  # + one step as a torch.func vmapped model

One cell = one protocol at one label fraction: every (init, seed) of the demo config (3 inits x 3 seeds), on
the demo's downstream set (`--data`; generated from configs/demo.yaml's `evaluate.synth` when absent, ~2 min).
The inits are stand-ins of the demo's: `random` and two other random ViTs saved as checkpoints (seeds 100 and
101), so no pipeline run is needed; the workload (shapes, steps, validations) is the stage's. Both ways call
the stage's own `run_group`: "one by one" gives it one (init, seed) at a time, "together" the whole cell. The
two alternate in one process (`--repeats` rounds), so load from other processes hits both alike; the wall
ratio is the median of the rounds. Both must give the same metric per run: the max |difference| is printed.

`--vmap` also times one training step of 9 heads stacked with `torch.func.stack_module_state` + `vmap` against
the 9 heads one by one (process CPU time, median of 5): the fine-tune ViT and the segmentation head.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from models.ecamp.export import timm_kwargs
from models.evaluate.classify import Normalization
from models.evaluate.datasets import load_splits
from models.evaluate.encoders import downstream_vit
from models.evaluate.pixels import decode_split
from models.evaluate.protocol import PROTOCOLS_OF_TASK, FeatureCache, Init, Job, run_group
from tasks.config import load_config

ROOT = Path(__file__).resolve().parent.parent
TASK_OF = {"linear_probe": "classification", "segmentation": "segmentation", "detection": "detection"}


def stand_in_inits(arch: dict, folder: Path) -> list[Init]:
    """`random` plus two random ViTs saved as checkpoints, named as the demo's pre-trained rows."""
    from safetensors.torch import save_file

    inits = [Init("random", None)]
    folder.mkdir(parents=True, exist_ok=True)
    for name, seed in (("mim_only", 100), ("ecamp", 101)):
        path = folder / f"{name}.safetensors"
        if not path.exists():
            torch.manual_seed(seed)
            save_file({k: v.contiguous() for k, v in downstream_vit(arch).state_dict().items()}, str(path))
        inits.append(Init(name, path))
    return inits


def jobs_of(cfg, data: Path, size: int) -> dict[str, Job]:
    if not (data / ".ecamp-synth.json").exists():
        from models.synth.corpus import generate_corpus

        print(f"generating the downstream set at {data} ...", flush=True)
        generate_corpus(cfg.evaluate.synth, data, overwrite=False)
    jobs = {}
    for spec in cfg.evaluate.datasets:
        splits = load_splits(spec.model_copy(update={"path": str(data)}))
        px = {s: decode_split(getattr(splits, s), size, splits.task, 2) for s in ("train", "val", "test")}
        seeds = tuple(cfg.evaluate.seeds)
        jobs[splits.task] = Job(
            splits, px, PROTOCOLS_OF_TASK[splits.task], tuple(cfg.evaluate.fractions), seeds
        )
    return jobs


def run_cell(
    job, protocol, members, idx, cache, arch, norm, pcfg, together: bool
) -> tuple[float, float, list[float]]:
    """(wall s, process CPU s, metric per run) of one cell trained one by one or together."""
    grid = arch["img_size"] // arch["patch_size"]
    groups = [members] if together else [[m] for m in members]
    start, cpu, values = time.perf_counter(), time.process_time(), []
    for group in groups:
        desc = f"{protocol} {'together' if together else 'one by one'}"
        values += [
            value for _, value, _ in run_group(job, protocol, group, idx, cache, arch, grid, norm, pcfg, desc)
        ]
    return time.perf_counter() - start, time.process_time() - cpu, values


def step_costs(models: list, x: torch.Tensor, y: torch.Tensor, loss_fn, repeats: int) -> tuple[float, float]:
    """Median process CPU time of one training step of every model: one by one, then stacked and vmapped."""
    from torch.func import functional_call, stack_module_state, vmap

    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    for block in getattr(base, "blocks", []):
        block.attn.fused_attn = False  # no vmap rule for the CPU flash-attention kernel

    def one_by_one() -> None:
        for k, model in enumerate(models):
            loss_fn(model(x[k]), y[k]).backward()

    def stacked() -> None:
        out = vmap(lambda p, b, xx: functional_call(base, (p, b), (xx,)))(params, buffers, x)
        torch.stack([loss_fn(out[k], y[k]) for k in range(len(models))]).sum().backward()

    costs: dict[str, list[float]] = {"one": [], "vmap": []}
    one_by_one(), stacked()  # warm-up
    for _ in range(repeats):
        for label, fn in (("one", one_by_one), ("vmap", stacked)):
            start = time.process_time()
            fn()
            costs[label].append(time.process_time() - start)
    return statistics.median(costs["one"]), statistics.median(costs["vmap"])


def vmap_steps(repeats: int = 5) -> None:
    """One training step of 9 heads: one by one vs stacked and vmapped (torch.func), process CPU time."""
    from models.evaluate.classify import classification_loss
    from models.evaluate.segment import SegConfig, SegHead, seg_loss

    g, b = 9, 32
    arch = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    seg_cfg = SegConfig(channels=(64, 32, 16), token_norm=False)  # token_norm's cumulative BN calls .item()
    vits = [downstream_vit(arch, 10, 0.0) for _ in range(g)]
    images, labels = torch.randn(g, b, 3, 64, 64), (torch.rand(g, b, 10) > 0.5).float()
    one, stacked = step_costs(vits, images, labels, lambda o, t: classification_loss(o, t, True), repeats)
    print(
        f"vmap fine-tune ViT: 9 steps one by one {one:.3f} s CPU, vmapped {stacked:.3f} s "
        f"(x{one / stacked:.2f})"
    )
    heads = [SegHead(64, 8, 64, seg_cfg) for _ in range(g)]
    tokens, masks = torch.randn(g, b, 64, 64), torch.rand(g, b, 64, 64) > 0.8
    one, stacked = step_costs(heads, tokens, masks, lambda o, t: seg_loss(o, t, seg_cfg), repeats)
    print(
        f"vmap segmentation head: 9 steps one by one {one:.3f} s CPU, vmapped {stacked:.3f} s "
        f"(x{one / stacked:.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("/tmp/ecamp_bench_downstream"))
    parser.add_argument("--fraction", type=int, default=1)
    parser.add_argument("--protocols", nargs="+", default=["linear_probe", "segmentation", "detection"])
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (one by one, together)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the demo's run.num_threads)")
    parser.add_argument("--vmap", action="store_true", help="also time one step as a vmapped model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs/demo.yaml", [])
    arch = timm_kwargs(cfg.pretrain_ecamp.model)
    norm = Normalization(mean=cfg.pretrain_ecamp.train.mean, std=cfg.pretrain_ecamp.train.std)
    inits = stand_in_inits(arch, args.data.parent / (args.data.name + "_inits"))
    jobs = jobs_of(cfg, args.data, arch["img_size"])
    cache = FeatureCache(arch, norm)
    members = [(init, seed) for init in inits for seed in cfg.evaluate.seeds]
    for protocol in args.protocols:
        job = jobs[TASK_OF[protocol]]
        idx = torch.tensor(job.splits.fractions[args.fraction], dtype=torch.long)
        run_cell(job, protocol, members[:1], idx, cache, arch, norm, cfg.evaluate.protocol, True)  # features
        walls: dict[bool, list[float]] = {False: [], True: []}
        cpus: dict[bool, list[float]] = {False: [], True: []}
        values = {}
        for _ in range(args.repeats):
            for together in (False, True):
                wall, cpu, values[together] = run_cell(
                    job, protocol, members, idx, cache, arch, norm, cfg.evaluate.protocol, together
                )
                walls[together].append(wall)
                cpus[together].append(cpu)
        one, grouped = statistics.median(walls[False]), statistics.median(walls[True])
        one_cpu, grouped_cpu = statistics.median(cpus[False]), statistics.median(cpus[True])
        diff = max(abs(a - b) for a, b in zip(values[False], values[True], strict=True))
        rounds = " ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(walls[False], walls[True], strict=True))
        print(
            f"{protocol} {args.fraction}% ({len(members)} runs, {args.threads} threads): wall one by one "
            f"{one:.1f} s, together {grouped:.1f} s (x{one / grouped:.2f}; rounds {rounds}); CPU "
            f"{one_cpu:.1f} s vs {grouped_cpu:.1f} s (x{one_cpu / grouped_cpu:.2f}); max |metric difference| "
            f"{diff:.2e}",
            flush=True,
        )
    if args.vmap:
        vmap_steps()


if __name__ == "__main__":
    main()
