"""The `ecamp` command line: demo, run, stage, lineage, synth. Wiring only."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from models.resources import CONFIG_DIR

app = typer.Typer(add_completion=False, no_args_is_help=True, help="ECAMP pre-training pipeline.")
console = Console(stderr=True)

DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


def _run_dir_arg(value: str) -> Path:
    """`--run-dir ""` would become Path("."): every artifact, catalog.duckdb and .lock in the working
    directory. Refused as an empty `run.run_dir` is; `--run-dir .` says so on purpose."""
    if not value.strip():
        _fail(ValueError("--run-dir is empty; name a run directory (e.g. runs/default, or . on purpose)"))
    return Path(value)


def _out_arg(value: str) -> Path:
    """`--out ""` would become Path("."): refused, like `--run-dir ""`; `--out .` is the working directory."""
    if not value.strip():
        _fail(ValueError("--out is empty; name the folder to write the corpus to (or . on purpose)"))
    return Path(value).absolute()


ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="pipeline YAML config")]
RunDirOpt = Annotated[
    Path | None,
    typer.Option("--run-dir", parser=_run_dir_arg, help="run directory (default: run.run_dir)"),
]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config field: a.b=value")]


def _quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without PREFECT_API_URL the CLI starts a temporary local server (flows/local_server.py); give it time
    # on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _check_config(config: Path, overrides: list[str] | None, stage: str | None = None):
    """Validate the config, the stage name and run.device before any flow, server or stage starts."""
    from models.devices import DeviceError, resolve_device
    from tasks.config import ConfigError, load_config
    from tasks.registry import get_stage

    try:
        cfg = load_config(config, overrides)
        if stage is not None:
            get_stage(stage)
        resolve_device(cfg.run.device)
    except (ConfigError, DeviceError, KeyError) as err:
        _fail(err)
    return cfg


def _check_run_dir(run_dir: Path | None, cfg) -> Path:
    """The run directory this command will use; one that exists as anything but a folder stops it here."""
    from tasks.lock import LOCK_FILE, RunDirectoryBusy, RunDirectoryInTheWay, run_lock

    target = Path(run_dir) if run_dir else Path(cfg.run.run_dir)
    if target.exists() and not target.is_dir():
        _fail(NotADirectoryError(f"run directory {target} is a file, not a folder"))
    busy_probe = (
        target / LOCK_FILE
    )  # another command running stages here: say so before a flow that would fail
    if busy_probe.exists():
        try:
            with run_lock(target):
                pass
        except (RunDirectoryBusy, RunDirectoryInTheWay) as err:
            _fail(err)
    return target


def _check_upstream(stage_name: str, run_dir: Path, name: str | None = None) -> None:
    """A stage started before its upstream stages succeeded fails here in one line, before any flow starts."""
    from tasks.base import MissingUpstreamError
    from tasks.registry import get_stage
    from tasks.runner import check_upstream

    try:
        check_upstream(get_stage(stage_name), run_dir, name)
    except MissingUpstreamError as err:
        _fail(err)


def _preflight(cfg, names: list[str] | None = None, until: str | None = None) -> None:
    """Each stage's own checks of the config (e.g. pre-training's initialization), before the run starts:
    `names`, or every stage up to `until`."""
    from tasks.registry import stage_names
    from tasks.runner import PreflightError, preflight

    if names is None:
        names = stage_names()
        names = names[: names.index(until) + 1] if until else names
    try:
        preflight(cfg, names)
    except PreflightError as err:
        _fail(err)


def _check_stages(until: str | None, force: list[str] | None = None, from_: str | None = None) -> None:
    """`--until`, `--from` and `--force` name stages: a typo must stop the command, not be ignored or fail
    mid-flow."""
    from tasks.registry import stage_names

    names = stage_names()
    flags = [("--until", until), ("--from", from_), *(("--force", f) for f in force or [])]
    for flag, name in flags:
        if name is not None and name not in names:
            _fail(ValueError(f"{flag} {name}: unknown stage (stages: {', '.join(names)})"))
    last = names.index(until) if until else len(names) - 1
    if from_ is not None and names.index(from_) > last:
        _fail(ValueError(f"--from {from_} comes after --until {until}: nothing to run"))
    late = [f for f in force or [] if names.index(f) > last]
    if late:
        _fail(ValueError(f"--force {', '.join(late)}: after --until {until}, so it would not run"))


def _run_flow(flow: Callable[..., Any], **kwargs: Any) -> Any:
    """Run a flow against PREFECT_API_URL or a temporary server that dies with this command; the failures a
    user can fix (`known_errors`) are one line, not a traceback."""
    from flows.local_server import prefect_api
    from flows.logs import console_tracebacks_only_for_bugs, known_errors

    known = known_errors()
    try:
        with prefect_api(say=lambda line: console.print(line, soft_wrap=True)):
            with console_tracebacks_only_for_bugs(known):
                return flow(**kwargs)
    except known as err:
        _fail(err)


def _fail(err: Exception) -> None:
    """`error: <message>` on one line: no markup read into the message (torch's `[enforce fail ...]`), no
    wrapping at 80 columns when stderr is a file, and a KeyError's message without repr quotes."""
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=2)


def _print_summaries(summaries: list[dict]) -> None:
    for s in summaries:
        console.print(f"  [bold]{s['stage']:<18}[/] {s['status']:<7} {', '.join(s['outputs'])}")


@app.command()
def synth(
    out: Annotated[
        Path, typer.Option("--out", parser=_out_arg, help="folder to write the MIMIC-layout corpus to")
    ],
    n: Annotated[int | None, typer.Option("--n", help="number of studies")] = None,
    config: Annotated[
        Path,
        typer.Option("--config", "-c", help="take the synth section from here (default: the demo's corpus)"),
    ] = DEMO_CONFIG,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing corpus at --out")] = False,
) -> None:
    """Generate the deterministic chest-X-ray-like demo corpus in MIMIC-CXR(-JPG) layout."""
    from models.synth.corpus import CorpusFolderError, generate_corpus
    from tasks.config import ConfigError, load_config

    overrides = list(set_ or []) + ([f"synth.n_studies={n}"] if n is not None else [])
    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        _fail(err)
    try:
        summary = generate_corpus(cfg.synth, out, overwrite=overwrite)
    except CorpusFolderError as err:
        _fail(err)
    console.print(f"wrote corpus to {out}\n{summary.describe()}")


def ensure_inputs(cfg, stages: list[str] | None = None, regenerate: bool = False) -> None:
    """The generated corpora the config asks for (demo corpus, synth evaluation sets), before any flow
    starts."""
    from models.synth.corpus import CorpusFolderError
    from tasks.inputs import prepare_inputs
    from tasks.registry import stage_names

    try:
        names = stage_names() if stages is None else stages
        prepare_inputs(cfg, lambda line: console.print(line, soft_wrap=True), names, regenerate)
    except (CorpusFolderError, ValueError) as err:
        _fail(err)


@app.command()
def demo(
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    until: Annotated[str | None, typer.Option(help="stop after this stage")] = None,
) -> None:
    """Generate the demo corpus if absent, then run the whole pipeline on configs/demo.yaml."""
    _quiet_prefect()
    cfg = _check_config(DEMO_CONFIG, set_)
    _check_run_dir(run_dir, cfg)
    _check_stages(until)
    _preflight(cfg, until=until)
    from flows.pipeline import stage_window

    ensure_inputs(cfg, stage_window(None, until)[0], regenerate=True)
    from flows.pipeline import ecamp_pipeline

    summaries = _run_flow(
        ecamp_pipeline,
        config_path=str(DEMO_CONFIG),
        run_dir=str(run_dir) if run_dir else None,
        until=until,
        overrides=set_,
    )
    _print_summaries(summaries)
    if until is None:
        _print_table(Path(run_dir or cfg.run.run_dir) / "evaluate" / "RESULTS.md")


@app.command()
def run(
    config: ConfigOpt,
    run_dir: RunDirOpt = None,
    until: Annotated[str | None, typer.Option(help="stop after this stage")] = None,
    set_: SetOpt = None,
    force: Annotated[list[str] | None, typer.Option(help="recompute this stage even if cached")] = None,
    from_: Annotated[
        str | None,
        typer.Option(
            "--from", help="resume: take the stages before this one as they are, recompute it and all after"
        ),
    ] = None,
) -> None:
    """Run the full pipeline (finished stages with unchanged inputs are skipped)."""
    _quiet_prefect()
    cfg = _check_config(config, set_)
    target = _check_run_dir(run_dir, cfg)
    _check_stages(until, force, from_)
    _preflight(cfg, until=until)
    if from_ is not None:
        _check_resumable(from_, target)
    from flows.pipeline import stage_window

    names, first = stage_window(from_, until)
    ensure_inputs(cfg, names[first:])
    from flows.pipeline import ecamp_pipeline

    summaries = _run_flow(
        ecamp_pipeline,
        config_path=str(config),
        run_dir=str(run_dir) if run_dir else None,
        until=until,
        overrides=set_,
        force=force,
        from_stage=from_,
    )
    _print_summaries(summaries)


def _check_resumable(from_: str, run_dir: Path) -> None:
    """Every stage before `--from` has a success here to resume from: one line before any flow starts."""
    from tasks.record import read_record
    from tasks.registry import stage_names

    names = stage_names()
    if missing := [n for n in names[: names.index(from_)] if read_record(run_dir, n) is None]:
        _fail(
            FileNotFoundError(
                f"--from {from_}: {', '.join(missing)} never succeeded in {run_dir}; run without --from first"
            )
        )


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="stage name, e.g. match_entities")],
    config: ConfigOpt,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="recompute even if cached")] = False,
) -> None:
    """Run a single stage against the artifacts already in the run directory."""
    _quiet_prefect()
    cfg = _check_config(config, set_, stage=name)
    _preflight(cfg, [name])
    _check_upstream(name, _check_run_dir(run_dir, cfg))
    from flows.pipeline import ecamp_stage

    summary = _run_flow(
        ecamp_stage,
        stage=name,
        config_path=str(config),
        run_dir=str(run_dir) if run_dir else None,
        overrides=set_,
        force=force,
    )
    _print_summaries([summary])


@app.command()
def ablate(
    table: Annotated[
        str, typer.Option(help="paper table: 7 (components), 8 (text composition), 9 (lambda_neg)")
    ],
    config: ConfigOpt,
    run_dir: RunDirOpt = None,
    rows: Annotated[list[str] | None, typer.Option("--row", help="only this row (repeatable)")] = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="recompute rows even if cached")] = False,
) -> None:
    """Pre-train one encoder per ablation row into <run_dir>/pretrain_ecamp__<row>/ (upstream stages must
    exist)."""
    _quiet_prefect()
    cfg = _check_config(config, set_)
    from tasks.pretrain_ecamp import ablation_rows

    try:
        ablation_rows(table, rows)
    except KeyError as err:
        _fail(err)
    _preflight(cfg, ["pretrain_ecamp"])
    _check_upstream("pretrain_ecamp", _check_run_dir(run_dir, cfg), f"ablation table {table}")
    from flows.pipeline import ecamp_ablations

    summaries = _run_flow(
        ecamp_ablations,
        table=table,
        config_path=str(config),
        run_dir=str(run_dir) if run_dir else None,
        rows=rows,
        overrides=set_,
        force=force,
    )
    _print_summaries(summaries)


@app.command()
def evaluate(
    config: ConfigOpt,
    run_dir: RunDirOpt = None,
    init: Annotated[
        list[str] | None,
        typer.Option(
            "--init",
            help="pixels | random | ecamp | mim_only | a checkpoint path (repeatable; default: config)",
        ),
    ] = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="recompute even if cached")] = False,
) -> None:
    """Evaluate encoders (this run's, or any checkpoint file) on the configured downstream datasets."""
    overrides = list(set_ or [])
    if init:
        overrides.append("evaluate.inits=[" + ", ".join(repr(i) for i in init) + "]")
    _quiet_prefect()
    cfg = _check_config(config, overrides, stage="evaluate")
    target = _check_run_dir(run_dir, cfg)
    ensure_inputs(cfg, ["evaluate"])
    _check_evaluate_inputs(cfg, target)
    from flows.pipeline import ecamp_stage

    summary = _run_flow(
        ecamp_stage,
        stage="evaluate",
        config_path=str(config),
        run_dir=str(run_dir) if run_dir else None,
        overrides=overrides,
        force=force,
    )
    _print_summaries([summary])
    _print_table(target / "evaluate" / "RESULTS.md")


def _check_evaluate_inputs(cfg, target: Path) -> None:
    """Datasets, checkpoint paths and run-directory encoders `evaluate` needs: one line before any flow
    starts."""
    from models.checkpoints import CheckpointError, read_state_dict
    from tasks.evaluate import NAMED_INITS, checkpoint_inits, missing_init
    from tasks.registry import get_stage
    from tasks.runner import input_paths, upstream_hashes

    stage = get_stage("evaluate")
    try:
        input_paths(stage, cfg)
    except FileNotFoundError as err:
        _fail(err)
    written = upstream_hashes(stage, target)
    for init in cfg.evaluate.inits:
        if init in NAMED_INITS and written[NAMED_INITS[init]] is None:
            _fail(FileNotFoundError(missing_init(init, str(target))))
    for init in checkpoint_inits(cfg.evaluate.inits):
        try:  # a file that is no state dict, or that would run code, is refused before any flow
            read_state_dict(Path(init).expanduser())
        except (CheckpointError, FileNotFoundError) as err:
            _fail(err)


@app.command()
def report(
    run_dir: RunDirOpt = None,
    config: Annotated[Path, typer.Option("--config", "-c")] = DEMO_CONFIG,
) -> None:
    """Print the evaluation table of a run (evaluate/RESULTS.md)."""
    _print_table(_run_dir_of(run_dir, config) / "evaluate" / "RESULTS.md")


def _run_dir_of(run_dir: Path | None, config: Path) -> Path:
    """--run-dir, else the config's run.run_dir (a bad config is one line)."""
    from tasks.config import ConfigError, load_config

    try:
        return Path(run_dir or load_config(config).run.run_dir)
    except ConfigError as err:
        _fail(err)


def _print_table(path: Path) -> None:
    if not path.is_file():
        _fail(FileNotFoundError(f"{path}: no evaluation table; run `ecamp evaluate` (or the pipeline) first"))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:  # the stage writes UTF-8 Markdown: this file was replaced
        _fail(
            ValueError(f"{path}: not the evaluation table (not UTF-8 text: {err.reason} at byte {err.start})")
        )
    typer.echo(text)


def _label(uri: str, info) -> str:
    from tasks.base import FILE_SCHEMA

    if info is None:
        return f"input {uri}"
    if info.schema_name == FILE_SCHEMA:
        return (
            f"{info.stage}/{info.name} file · sha {info.content_hash[:12]} · config {info.config_hash}"
            f" · {info.code_version} · run {info.run_id}"
        )
    return (
        f"{info.stage}/{info.name} {info.rows} rows · {info.schema_name} v{info.schema_version}"
        f" · sha {info.content_hash[:12]} · config {info.config_hash} · {info.code_version}"
    )


@app.command()
def notify(
    webhook: Annotated[
        str, typer.Option(help="URL a failed ecamp-pipeline run is POSTed to (Slack, Teams, ...)")
    ],
    cancel_pending_after: Annotated[
        int | None, typer.Option(help="also cancel an ecamp-gpu run still Pending after this many seconds")
    ] = None,
) -> None:
    """Automations on the Prefect server (PREFECT_API_URL): a failed pipeline run calls the webhook;
    optionally a GPU run stuck in Pending is cancelled. Running it again replaces them."""
    from prefect.settings import PREFECT_API_URL

    from flows.automations import install

    if not PREFECT_API_URL.value():
        _fail(ValueError("no Prefect server: set PREFECT_API_URL (automations live on the server)"))
    for name in install(webhook, cancel_pending_after):
        console.print(f"automation: {name}")


@app.command()
def lineage(
    artifact: Annotated[str, typer.Argument(help="artifact name (reports), stage/name, or a .parquet path")],
    run_dir: RunDirOpt = None,
    config: Annotated[Path, typer.Option("--config", "-c")] = DEMO_CONFIG,
) -> None:
    """Print an output's upstream chain (Parquet or model file), down to the input files, from the run's
    catalog."""
    from data_contracts.catalog import latest, lineage_tree
    from tasks.registry import producer_of, stages

    target = _run_dir_of(run_dir, config)
    name = artifact.rsplit("/", 1)[-1]
    outputs = [o for s in stages() for o in s.outputs]
    known = producer_of(name) or any(o.split(".")[0] == name for o in outputs)
    if not artifact.endswith(".parquet") and not known:
        _fail(KeyError(f"no stage declares an output '{name}' (outputs: {', '.join(outputs)})"))
    info = latest(target, artifact)
    if info is None:
        _fail(FileNotFoundError(f"no artifact '{artifact}' in the catalog of {target}"))
    root = lineage_tree(target, info)
    for line in _tree_lines(root):
        typer.echo(line)


catalog_app = typer.Typer(no_args_is_help=True, help="The run's DuckDB catalog of artifact versions.")
app.add_typer(catalog_app, name="catalog")


@catalog_app.command("rebuild")
def catalog_rebuild(
    run_dir: Annotated[Path, typer.Option("--run-dir", parser=_run_dir_arg, help="run directory")],
) -> None:
    """Rebuild catalog.duckdb from the lineage every artifact carries in its own Parquet metadata."""
    from data_contracts.catalog import catalog_path, rebuild
    from tasks.lock import RunDirectoryBusy, RunDirectoryInTheWay, run_lock

    if not run_dir.is_dir():
        what = "a file, not a run directory" if run_dir.exists() else "no such run directory"
        _fail(FileNotFoundError(f"{run_dir}: {what}"))
    try:
        with run_lock(run_dir):
            n = rebuild(run_dir)
    except (RunDirectoryBusy, RunDirectoryInTheWay) as err:
        _fail(err)
    console.print(f"rebuilt {catalog_path(run_dir)}: {n} artifacts", soft_wrap=True)


def _tree_lines(
    node, prefix: str = "", last: bool = True, top: bool = True, seen: set | None = None
) -> list[str]:
    """Plain-text tree (no wrapping or cropping, so paths stay whole and greppable). An artifact already
    expanded higher up is printed once more with `(upstream shown above)` instead of its whole chain."""
    seen = set() if seen is None else seen
    branch = "" if top else ("└── " if last else "├── ")
    key = (node.uri, node.content_hash)
    repeated = node.info is not None and node.upstream and key in seen
    lines = [prefix + branch + _label(node.uri, node.info) + (" (upstream shown above)" if repeated else "")]
    if repeated:
        return lines
    seen.add(key)
    child_prefix = prefix if top else prefix + ("    " if last else "│   ")
    for i, child in enumerate(node.upstream):
        lines += _tree_lines(child, child_prefix, i == len(node.upstream) - 1, top=False, seen=seen)
    return lines


if __name__ == "__main__":
    app()
