"""Stage 8, `evaluate`: does pre-training pay off? Encoders × downstream datasets × label fractions × seeds.

Initializations (`inits`): `pixels` (no encoder: the reference row every encoder must beat, see
`models.evaluate.baseline`), `random`, `ecamp` (this run's `pretrain_ecamp/encoder.safetensors`), `mim_only`
(the `pretrain_ecamp__mim_only` ablation row: ECAMP with the text side and SR off) or a path to any
timm-loadable checkpoint (an ECAMP export, MAE ImageNet weights as `.pth` or safetensors). Datasets: the
official split lists (`kind: official | siim`), a generic CSV (`generic`, e.g. the fundus sets of Tables
10–11) or a generated corpus's downstream sets (`synth`). Classification datasets run fine-tuning and the
linear probe; segmentation and detection run their frozen-encoder heads (paper §4.2–4.5).

Outputs under `<run_dir>/evaluate/`: `eval_results` (one row per run, with the initialization's content hash),
`RESULTS.md` (the table, laid out like Tables 4–6, paper numbers beside ours) and `eval_plot.png`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from data_contracts.evaluate import EvalResult
from models.ecamp.export import timm_kwargs
from models.evaluate.baseline import PIXELS
from models.evaluate.classify import Normalization
from models.evaluate.datasets import DatasetSpec, load_splits
from models.evaluate.encoders import LoadReport, downstream_vit, export_arch, load_init
from models.evaluate.pixels import decode_split
from models.evaluate.protocol import (
    PROTOCOLS_OF_TASK,
    FeatureCache,
    Init,
    Job,
    JobInputs,
    ProtocolConfig,
    lesion_free_test_warning,
    run_job,
    run_jobs_in_parallel,
)
from models.evaluate.report import plot_results, results_table
from models.seeds import Seed
from models.synth.corpus import SynthConfig
from tasks.base import StageConfig, StageContext
from tasks.stage import Stage, variant_name

ENCODER = "pretrain_ecamp/encoder.safetensors"
MIM_ONLY = f"{variant_name('pretrain_ecamp', 'mim_only')}/encoder.safetensors"
NAMED_INITS = {"ecamp": ENCODER, "mim_only": MIM_ONLY}
TABLE, PLOT = "RESULTS.md", "eval_plot.png"
PROTOCOLS = ("finetune", "linear_probe", "segmentation", "detection")


class Config(StageConfig):
    """What to evaluate; how each head trains is `protocol` (official recipes by default)."""

    inits: list[str] = Field(
        default_factory=lambda: [PIXELS, "random", "ecamp"],
        description="pixels | random | ecamp | mim_only | a checkpoint path; one table row each",
    )
    datasets: list[DatasetSpec] = Field(default_factory=list)
    # an empty list would evaluate nothing and replace the last results with an empty table
    protocols: list[str] = Field(
        default_factory=lambda: list(PROTOCOLS), min_length=1, description="which heads to run"
    )
    fractions: list[int] = Field(
        default_factory=lambda: [1, 10, 100], min_length=1, description="label percent of train"
    )
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    protocol: ProtocolConfig = Field(default_factory=ProtocolConfig)
    decode_workers: int = Field(2, ge=1, description="threads decoding images (once per split)")
    workers: int = Field(
        1,
        ge=1,
        description="datasets evaluated at once, each in its own process with its share of the cores (1: one "
        "after the other in the stage's process, one set's images in memory at a time; above 1 every set's "
        "are)",
    )
    synth: SynthConfig | None = Field(
        None,
        description="`ecamp demo` / `ecamp evaluate` generate the `synth` datasets' folder from this when "
        "absent",
    )

    @field_validator("protocols")
    @classmethod
    def _known_protocols(cls, value: list[str]) -> list[str]:
        if unknown := [p for p in value if p not in PROTOCOLS]:
            raise ValueError(f"unknown protocols {unknown} (known: {', '.join(PROTOCOLS)})")
        return value

    @field_validator("fractions")
    @classmethod
    def _percent(cls, value: list[int]) -> list[int]:
        if bad := [f for f in value if not 0 < f <= 100]:
            raise ValueError(f"fractions are label percents in (0, 100], got {bad}")
        return sorted(set(value))

    @field_validator("inits")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value) or not value:
            raise ValueError(f"inits must be a non-empty list without repeats, got {value}")
        return value


def init_of(entry: str, ctx: StageContext) -> Init:
    """`pixels`, `random`, a named run-directory encoder, or a path (its file stem names the row)."""
    if entry == PIXELS:
        return Init(PIXELS, None, pixels=True)
    if entry == "random":
        return Init("random", None)
    if entry in NAMED_INITS:
        ref = NAMED_INITS[entry]
        if not ctx.has(ref):
            hint = (
                "ecamp ablate --table 7 --row mim_only" if entry == "mim_only" else "the pretrain_ecamp stage"
            )
            raise FileNotFoundError(
                f"evaluate: init '{entry}' needs {ref}, which this run has not written: run {hint}"
            )
        return Init(entry, ctx.read_path(ref))
    path = Path(entry).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"evaluate: init '{entry}' is neither pixels/random/ecamp/mim_only nor an existing file"
        )
    generic = path.stem in ("encoder", "model", "checkpoint", "checkpoint-best")  # say whose: run/encoder
    return Init(f"{path.parent.name}/{path.stem}" if generic else path.stem, path.resolve())


def missing_init(entry: str, where: str) -> str:
    hint = "ecamp ablate --table 7 --row mim_only" if entry == "mim_only" else "the pretrain_ecamp stage"
    return f"evaluate: init '{entry}' needs {NAMED_INITS[entry]}, which {where} has not written: run {hint}"


def architecture(ctx: StageContext, inits: list[Init]) -> dict[str, Any]:
    """The ViT every row shares: the pre-trained export's own header when there is one, else the config's."""
    for init in inits:
        if init.path is not None and (arch := export_arch(init.path)) is not None:
            return arch
    return timm_kwargs(ctx.config.pretrain_ecamp.model)


def run(ctx: StageContext, cfg: Config) -> None:
    if not cfg.datasets:
        raise ValueError(
            "evaluate: no datasets configured (evaluate.datasets); see configs/demo.yaml for one"
        )
    inits = [init_of(entry, ctx) for entry in cfg.inits]
    arch = architecture(ctx, inits)
    train_cfg = ctx.config.pretrain_ecamp.train
    norm = Normalization(mean=train_cfg.mean, std=train_cfg.std)
    reports = {}
    for init in inits:
        if init.pixels:
            reports[init.name] = LoadReport("raw pixels, no encoder", PIXELS)
            ctx.log.info("init %s: no encoder (the reference row: models on the raw pixels)", init.name)
            continue
        report = load_init(downstream_vit(arch), init.path)
        reports[init.name] = report
        ctx.log.info("init %s: %s%s", init.name, report.describe(), "".join(f"; {n}" for n in report.notes))
    cache = FeatureCache(
        arch, norm, cfg.protocol.pixels.size
    )  # frozen features shared by every dataset that reads the same images
    rows: list[dict[str, Any]] = []
    jobs = []
    for spec in cfg.datasets:
        job = prepare(ctx, spec, cfg, arch["img_size"])
        if not job.protocols:
            ctx.log.warning(
                "%s: none of the protocols %s applies to a %s set: skipped",
                spec.name,
                cfg.protocols,
                spec.task,
            )
        elif cfg.workers == 1:  # one set decoded at a time: a paper-size set's pixels take gigabytes
            rows += run_job(job, inits, reports, arch, norm, cfg.protocol, ctx.log.info, cache)
        else:
            jobs.append(job)
    if jobs:
        rows = run_jobs_in_parallel(
            jobs, JobInputs(inits, reports, arch, norm, cfg.protocol), cfg.workers, ctx.log.info
        )
    ctx.write("eval_results", rows, EvalResult)
    paper_names = {s.name: s.paper for s in cfg.datasets if s.paper}
    table = results_table(rows, paper_names, cfg.protocol.pixels.size) if rows else "no results\n"
    ctx.path(TABLE).write_text("# Downstream evaluation\n\n" + table)
    if rows:
        plot_results(rows, ctx.path(PLOT))
    ctx.log.info("evaluation table:\n%s", table)


def prepare(ctx: StageContext, spec: DatasetSpec, cfg: Config, size: int) -> Job:
    """Read one dataset's splits and decode them once at the encoder's input size."""
    splits = load_splits(spec)
    protocols = tuple(p for p in PROTOCOLS_OF_TASK[splits.task] if p in cfg.protocols)
    missing = [f for f in cfg.fractions if f not in splits.fractions]
    if missing:
        raise ValueError(f"{spec.name}: no {missing}% label subsets (it has {sorted(splits.fractions)})")
    for name in ("train", "val", "test"):
        if not getattr(splits, name):
            raise ValueError(f"{spec.name}: the {name} split is empty")
    ctx.log.info(
        "%s (%s, %d classes): train %d / val %d / test %d; subsets %s",
        spec.name,
        splits.task,
        len(splits.classes),
        len(splits.train),
        len(splits.val),
        len(splits.test),
        {f: len(splits.fractions[f]) for f in cfg.fractions},
    )
    pixels = {
        s: decode_split(getattr(splits, s), size, splits.task, cfg.decode_workers)
        for s in ("train", "val", "test")
    }
    if warning := lesion_free_test_warning(spec.name, splits.task, pixels["test"]):
        ctx.log.warning(warning)
    return Job(splits, pixels, protocols, tuple(cfg.fractions), tuple(cfg.seeds))


def dataset_files(config: Any) -> list[Path]:
    """The dataset lists/folders and checkpoint-path inits: outside the run directory, fingerprinted."""
    section = config.evaluate
    paths = [Path(s.path) for s in section.datasets]
    paths += [Path(e).expanduser() for e in checkpoint_inits(section.inits)]
    return paths


def checkpoint_inits(inits: list[str]) -> list[str]:
    """The inits that name a checkpoint file: every entry but pixels, random and the run's named encoders."""
    return [e for e in inits if e not in (PIXELS, "random", *NAMED_INITS)]


STAGE = Stage(
    name="evaluate",
    version="1",
    config=Config,
    run=run,
    summary="downstream evaluation: fine-tune / linear probe / segmentation / detection at 1/10/100 % labels",
    reads=(ENCODER, MIM_ONLY),
    optional=(ENCODER, MIM_ONLY, PLOT),
    writes={"eval_results": EvalResult},
    files=(TABLE, PLOT),
    sections=("pretrain_ecamp",),
    input_files=dataset_files,
    inputs_hint="evaluate.datasets[*].path, or a checkpoint path in evaluate.inits",
    gpu=True,
)
