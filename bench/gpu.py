"""GPU checks of the paper configuration, kept ready for the day a GPU is lent (run by hand, a few minutes):

    .venv/bin/python bench/gpu.py                          # train + ddp + jpeg on the visible GPUs
    .venv/bin/python bench/gpu.py --only train --batch 64 --steps 20
    .venv/bin/python bench/gpu.py --smoke                  # the same code paths on CPU with the demo model

1. train: images/s and MFU of one pre-training step of the paper model (configs/paper.yaml: ViT-B/16 at 224,
   SR at 448, decoder 512 x 4, BERT 6 x 768, 256 tokens) in bf16 autocast on one GPU. FLOPs are counted by
   torch.utils.flop_counter on one forward + backward; MFU is achieved FLOP/s over the device's dense bf16
   peak (PEAK_TFLOPS by device name, or --peak-tflops). A batch that does not fit is halved until it does.
2. ddp: the same step under torchrun on every GPU of the node (DistributedDataParallel, NCCL): images/s of the
   node and its scaling against N x one GPU (with one GPU: the DDP path itself, world size 1).
3. jpeg: MIMIC-CXR-JPG-size JPEGs (3,000 x 2,500, upscaled from the repository's real radiographs) decoded by
   torchvision.io.decode_jpeg on the GPU (batched) vs on one CPU core: images/s of each; then the training
   data path with `pretrain_ecamp.train.decode: device` (bytes read in the process, decode + crop + resize on
   the GPU): its images/s and its largest pixel difference (in [0, 1] grey levels) from the worker path's CPU
   decoding.
4. vllm: bulk distillation's reports/s and generated tokens/s, vLLM + LoRA at a chosen concurrency next to the
   in-process transformers backend (bench/bulk_throughput.py with Vicuna-7B's shape; needs `make serve-env`).

Prints one JSON line per part; copy them to bench/RESULTS.md ("gpu").
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched as substrings of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0}
DEMO_MODEL = dict(
    img_size=64,
    hr_size=128,
    patch_size=8,
    embed_dim=64,
    depth=2,
    num_heads=4,
    decoder_embed_dim=64,
    decoder_depth=2,
    decoder_num_heads=4,
    sr_window=4,
    vocab_size=1000,
    text_hidden=64,
    text_layers=2,
    text_heads=4,
    text_ffn=128,
    max_len=96,
)


def model_config(smoke: bool) -> Any:
    from models.ecamp.model import ECAMPConfig
    from tasks.config import load_config

    if smoke:
        return ECAMPConfig(**DEMO_MODEL)
    return load_config(ROOT / "configs" / "paper.yaml").pretrain_ecamp.model


def batch_maker(cfg: Any, batch: int, device: torch.device):
    """Real MLM batches (the collator on IU X-ray reports) and image tensors of the paper's shapes."""
    from models.text.masking import TextCollator, TextMaskingConfig
    from models.text.wordpiece import train_wordpiece
    from tests.real_data import iu_xray_texts

    reports = iu_xray_texts()
    tokenizer = train_wordpiece(reports, vocab_size=min(cfg.vocab_size, 3000), min_frequency=2)
    collate = TextCollator(tokenizer, TextMaskingConfig(max_len=cfg.max_len))
    rng = np.random.default_rng(0)
    side = cfg.sr_window * 2 * cfg.patch_size

    def make(i: int) -> dict[str, torch.Tensor]:
        b = collate([(reports[(i * batch + j) % len(reports)], None) for j in range(batch)], rng)
        b["imgs_lr"] = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
        b["imgs_hr"] = torch.randn(batch, cfg.in_chans, cfg.hr_size, cfg.hr_size)
        b["window"] = torch.tensor([[0, 0, side, side]] * batch)
        return {k: v.to(device, non_blocking=True) for k, v in b.items()}

    return make


def train_steps(
    model: torch.nn.Module, make, steps: int, device: torch.device, flops: bool
) -> dict[str, float]:
    """Seconds per optimiser step (median after 3 warm-up steps) and FLOPs of one step when asked."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.ecamp.pretrain import param_groups

    inner = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(param_groups(inner, 0.05), lr=1.5e-4, betas=(0.9, 0.95))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = [make(i) for i in range(4)]

    def step(b: dict[str, torch.Tensor]) -> None:
        with autocast:
            losses = model(**b)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for b in batches[:3]:
        step(b)
    counted = 0.0
    if flops:
        with FlopCounterMode(display=False) as counter:
            step(batches[3])
        counted = float(counter.get_total_flops())
    times = []
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step(batches[i % len(batches)])
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"step_s": float(np.median(times)), "flops_per_step": counted}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(override: float | None) -> float | None:
    if override:
        return override * 1e12
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def bench_train(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from models.ecamp.model import ECAMP

    cfg = model_config(args.smoke)
    batch = args.batch
    while True:
        torch.manual_seed(0)
        model = ECAMP(cfg).to(device)
        try:
            result = train_steps(model, batch_maker(cfg, batch, device), args.steps, device, flops=True)
            break
        except torch.cuda.OutOfMemoryError:
            del model
            torch.cuda.empty_cache()
            if batch == 1:
                raise
            print(f"batch {batch} does not fit: trying {batch // 2}", file=sys.stderr)
            batch //= 2
    peak = peak_flops(args.peak_tflops)
    achieved = result["flops_per_step"] / result["step_s"]
    return {
        "part": "train",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": "demo" if args.smoke else "paper",
        "batch": batch,
        "step_s": round(result["step_s"], 4),
        "images_per_s": round(batch / result["step_s"], 1),
        "tflops_per_step": round(result["flops_per_step"] / 1e12, 3),
        "achieved_tflops": round(achieved / 1e12, 1),
        "mfu": round(achieved / peak, 3) if peak else None,
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1)
        if device.type == "cuda"
        else None,
    }


def ddp_worker(args: argparse.Namespace) -> None:
    """One rank of the DDP check (started by torchrun); rank 0 prints the node's images/s."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from models.ecamp.model import ECAMP

    cuda = torch.cuda.is_available() and not args.smoke
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    cfg = model_config(args.smoke)
    model = DistributedDataParallel(ECAMP(cfg).to(device), device_ids=[device.index] if cuda else None)
    result = train_steps(model, batch_maker(cfg, args.batch, device), args.steps, device, flops=False)
    step = torch.tensor(result["step_s"], device=device)
    dist.all_reduce(step, op=dist.ReduceOp.MAX)  # the node is as fast as its slowest rank
    if rank == 0:
        print(
            json.dumps(
                {
                    "part": "ddp",
                    "world": world,
                    "batch_per_rank": args.batch,
                    "step_s": round(float(step), 4),
                    "images_per_s": round(world * args.batch / float(step), 1),
                }
            )
        )
    dist.destroy_process_group()


def bench_ddp(args: argparse.Namespace, single_images_per_s: float | None) -> dict[str, Any]:
    nproc = torch.cuda.device_count() if (torch.cuda.is_available() and not args.smoke) else 1
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        __file__,
        "--only",
        "ddp-worker",
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
    ]
    cmd += ["--smoke"] if args.smoke else []
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"DDP run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"part": "ddp"')))
    if single_images_per_s:
        result["scaling_vs_n_single"] = round(result["images_per_s"] / (nproc * single_images_per_s), 3)
    return result


def mimic_size_jpegs(n: int) -> list[bytes]:
    """n JPEGs of 3,000 x 2,500 (MIMIC-CXR-JPG's usual size), upscaled from the real radiographs in
    tests/data."""
    from PIL import Image

    from models.images import load_grayscale
    from tests.real_data import REAL_DATA

    sources = []
    for path in sorted((REAL_DATA / "images").iterdir()):
        try:
            sources.append(load_grayscale(path))
        except Exception:  # noqa: BLE001  (a fixture the loader refuses is no JPEG source)
            continue
    out = []
    for i in range(n):
        pixels = np.clip(sources[i % len(sources)] * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels).resize((2500, 3000), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


def write_jpegs(folder: Path, jpegs: list[bytes]) -> list[str]:
    """The JPEGs as files `folder`/0.jpg, 1.jpg, ... (the training data path reads files); their paths."""
    paths = []
    for i, data in enumerate(jpegs):
        path = folder / f"{i}.jpg"
        path.write_bytes(data)
        paths.append(str(path))
    return paths


def bench_jpeg(args: argparse.Namespace) -> dict[str, Any]:
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = mimic_size_jpegs(args.jpegs)
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for d in data:
        decode_jpeg(d, mode=ImageReadMode.GRAY)
    cpu_rate = len(data) / (time.perf_counter() - t0)
    result: dict[str, Any] = {
        "part": "jpeg",
        "size": "3000x2500",
        "images": len(data),
        "cpu_1core_images_per_s": round(cpu_rate, 1),
    }
    if torch.cuda.is_available() and not args.smoke:
        decode_jpeg(data[:4], device="cuda", mode=ImageReadMode.GRAY)  # warm-up (nvjpeg handles)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for start in range(0, len(data), 32):
            decode_jpeg(data[start : start + 32], device="cuda", mode=ImageReadMode.GRAY)
        torch.cuda.synchronize()
        gpu_rate = len(data) / (time.perf_counter() - t0)
        result |= {"gpu_images_per_s": round(gpu_rate, 1), "gpu_vs_cpu_core": round(gpu_rate / cpu_rate, 1)}
    return result | device_decode_path(args, jpegs)


def device_decode_path(args: argparse.Namespace, jpegs: list[bytes]) -> dict[str, Any]:
    """The pre-training data path with `decode: device` (PretrainDataset.to_device: decode, crop to 448,
    resize to 224 on the device) in images/s, and its largest pixel difference from the worker path (CPU
    libjpeg)."""
    import tempfile

    from models.ecamp.config import PretrainConfig
    from models.ecamp.data import PretrainCollator, PretrainDataset, PretrainRecord

    device = torch.device("cpu" if args.smoke else "cuda")
    model = model_config(args.smoke)
    with tempfile.TemporaryDirectory() as folder:
        recs = [
            PretrainRecord(str(i), str(i), path, "t", None, (0.25, 0.25, 0.75, 0.75))
            for i, path in enumerate(write_jpegs(Path(folder), jpegs))
        ]
        collate = PretrainCollator(lambda texts, rng: {}, seed=0)
        on_device = PretrainDataset(recs, model, PretrainConfig(decode="device"))
        in_worker = PretrainDataset(recs, model, PretrainConfig(decode="worker"))
        n = min(len(recs), 4)
        first = on_device.to_device(
            collate([on_device[(0, i)] for i in range(n)]), device
        )  # also the warm-up
        reference = in_worker.to_device(collate([in_worker[(0, i)] for i in range(n)]), torch.device("cpu"))
        gap = float((first["imgs_hr"].cpu() - reference["imgs_hr"]).abs().max() * PretrainConfig().std)
        sync(device)
        t0 = time.perf_counter()
        for start in range(0, len(recs), 32):
            batch = collate([on_device[(1, i)] for i in range(start, min(start + 32, len(recs)))])
            on_device.to_device(batch, device)
        sync(device)
        rate = len(recs) / (time.perf_counter() - t0)
    return {"device_path_images_per_s": round(rate, 1), "device_vs_worker_max_abs_diff": round(gap, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["train", "ddp", "jpeg", "vllm", "ddp-worker"])
    parser.add_argument(
        "--batch", type=int, default=128, help="images per GPU (paper: 256 per GPU x accum 8)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps after 3 warm-up steps")
    parser.add_argument("--jpegs", type=int, default=64)
    parser.add_argument(
        "--peak-tflops", type=float, help="the device's dense bf16 peak when not in PEAK_TFLOPS"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, demo-size model: checks the code paths only"
    )
    args = parser.parse_args()
    if args.only == "ddp-worker":
        ddp_worker(args)
        return
    if not (args.smoke or torch.cuda.is_available()):
        raise SystemExit("no CUDA device: bench/gpu.py measures GPUs (use --smoke to check its code on CPU)")
    if args.smoke:
        args.batch, args.steps, args.jpegs = min(args.batch, 4), min(args.steps, 2), min(args.jpegs, 2)
    device = torch.device("cpu" if args.smoke else "cuda")
    single = None
    if args.only in (None, "train"):
        train = bench_train(args, device)
        single = train["images_per_s"]
        print(json.dumps(train), flush=True)
    if args.only in (None, "ddp"):
        print(json.dumps(bench_ddp(args, single)), flush=True)
    if args.only in (None, "jpeg"):
        print(json.dumps(bench_jpeg(args)), flush=True)
    if args.only in (None, "vllm"):
        bench_vllm(args)


def bench_vllm(args: argparse.Namespace) -> None:
    """Part 4: bulk distillation throughput, vLLM + LoRA against the in-process backend
    (bench/bulk_throughput.py; Vicuna-7B's shape on a GPU). Needs the serving environment, which a machine
    without internet cannot install."""
    serve = ROOT / ".venv-vllm" / "bin" / "python"
    if not serve.exists():
        print(json.dumps({"part": "vllm", "skipped": f"no serving environment at {serve} (make serve-env)"}))
        return
    shape = (
        ["--reports", "8", "--max-new", "16"]
        if args.smoke
        else ["--shape", "vicuna7b", "--reports", "512", "--concurrency", "128", "--batch", "64"]
    )
    subprocess.run([sys.executable, str(ROOT / "bench" / "bulk_throughput.py"), *shape], check=True)


if __name__ == "__main__":
    main()
