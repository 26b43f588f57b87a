"""The generated corpora a config asks for, made before any stage reads them (`ecamp demo`, the deployments).

`data.generate: true` says that `data.root` is the demo generator's corpus (from the `synth` section), and
`evaluate.synth` that the `synth`-kind evaluation sets are generated too. A folder the generator did not
write is never touched: the run stops with the generator's message instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def ensure_generated(
    root: Path, synth_cfg: Any, what: str, say: Callable[[str], None], regenerate: bool = True
) -> None:
    """Generate a corpus at `root` from `synth_cfg` when it is missing. A corpus the generator made from
    another synth config is regenerated when `regenerate` (`ecamp demo`: editing the synth section takes
    effect) and kept otherwise (a pipeline run never replaces data under a user's feet)."""
    from models.synth.corpus import check_replaceable, corpus_marker, generate_corpus

    marker = corpus_marker(root)
    if marker is not None and marker.get("config") == synth_cfg.model_dump(mode="json"):
        say(f"{what} present at {root}")
        return
    if marker is not None and not regenerate:
        say(f"{what} at {root} was generated from another synth config: kept (`ecamp demo` regenerates it)")
        return
    check_replaceable(
        root, overwrite=True
    )  # a user's files or edits: refused before a line says "generating"
    say(f"generating the {what} at {root} ...")
    summary = generate_corpus(synth_cfg, root, overwrite=True)
    say(summary.describe())


def generated_inputs(config: Any, stages: Iterable[str]) -> list[tuple[Path, Any, str]]:
    """(folder, synth config, what) of each generated input the config asks for and `stages` read: the demo
    corpus at data.root (extract_reports, and only when `data.source` is mimic: a manifest run never reads
    data.root), the synth evaluation sets (evaluate; always as `evaluate.synth` says: they are the config's
    own, never a user's data). Nothing a run will not read is generated."""
    stages = set(stages)
    wanted = []
    if "extract_reports" in stages and config.data.generate and config.data.source == "mimic":
        if not config.data.root:
            raise ValueError(
                "data.generate is true but data.root is not set: name the folder to generate into"
            )
        wanted.append((Path(config.data.root), config.synth, "demo corpus"))
    if "evaluate" in stages and config.evaluate.synth is not None:
        for root in dict.fromkeys(Path(s.path) for s in config.evaluate.datasets if s.kind == "synth"):
            wanted.append((root, config.evaluate.synth, "downstream evaluation set"))
    return wanted


def generated_roots(config: Any, stages: Iterable[str]) -> list[Path]:
    """The folders `prepare_inputs` makes when absent for `stages`: a missing one is not a missing input."""
    return [root for root, _, _ in generated_inputs(config, stages)]


def prepare_inputs(
    config: Any, say: Callable[[str], None], stages: Iterable[str], regenerate: bool = False
) -> None:
    """Make the generated inputs (`generated_inputs`) that are absent. `regenerate` (see `ensure_generated`)
    applies to the demo corpus; the evaluation sets are always the config's own, so always regenerated."""
    for root, synth_cfg, what in generated_inputs(config, stages):
        ensure_generated(root, synth_cfg, what, say, regenerate or what != "demo corpus")
