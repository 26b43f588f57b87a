"""Every shell command in the README and docs/ says something the code accepts.

Each command of a ```bash block is either checked here, or named in NOT_HERE with the reason it cannot run on
this machine. A new command in the docs fails `test_every_documented_command_is_checked_or_excused` until it
is one or the other.

- `ecamp ...`: parsed by the real CLI (its options and arguments), then checked the way the command checks
  them first: `--set` keys and values against the config (with `-c`), stage names, ablation rows. Bracketed
  optional parts (`[--row no_rf ...]`) are checked too, the CLI reference's metavariables (DIR, N, STAGE)
  given values.
- `make TARGET`: the target exists (`make -n`).
- `prefect ...`: the deployment test runs these against a real server (tests/test_deployments.py
  README_COMMANDS).
- The `ecamp` commands themselves run end to end in tests/test_cli.py and tests/test_pipeline_e2e.py.
"""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
import typer

from tests.conftest import REPO_ROOT
from tests.test_deployments import README_COMMANDS

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]

# Commands that cannot run on this machine, by their start: why.
NOT_HERE = {
    "export ": "sets a variable for the commands after it",
    "vllm serve": "a 7B model on a GPU",
    ".venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model /models/": "a 7B model on a GPU "
    "(tests/test_vllm_real.py serves a tiny one with the same arguments)",
    'cd "$ECAMP_HOME" && .venv/bin/python -m torch.distributed.run --nnodes=2': "a second GPU node",
    "python -c \"import sys; sys.path.insert(0, 'tests')": "the hostile pass's set-up, run by that pass",
    "cd /tmp/hostile/base": "the hostile pass's set-up, run by that pass",
}
# The CLI reference's metavariables (as in `--out DIR`), and the values the checks give them.
METAVARIABLES = {
    "DIR": "/tmp/ecamp-docs-check",
    "STAGE": "train_gloria",
    "N": "12",
    "key=value": "synth.n_studies=12",
}


def commands_of(text: str) -> list[str]:
    """The commands of every ```bash block: continuations joined, comments and blank lines dropped."""
    out = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        joined, pending = re.sub(r"\\\n\s*", " ", block), ""
        for line in joined.splitlines():
            pending = f"{pending} {line.strip()}" if pending else strip_comment(line).strip()
            if pending and balanced(pending):  # a quoted value may go on over the next lines
                out.append(pending)
                pending = ""
        assert not pending, f"unclosed quote in a ```bash block: {pending}"
    return out


def balanced(command: str) -> bool:
    try:
        shlex.split(command)
    except ValueError:
        return False
    return True


def strip_comment(line: str) -> str:
    """The line before a `#` that is outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def documented() -> list[tuple[str, str]]:
    return [(doc.name, c) for doc in DOCS for c in commands_of(doc.read_text())]


def variants(command: str) -> list[list[str]]:
    """The command without its optional [parts], and with all of them (metavariables given values)."""
    bare = re.sub(r"\s*\[[^\]]*\]", "", command)
    full = re.sub(r"\[([^\]]*)\]", r"\1", command).replace(" ...", "")
    out = []
    for text in dict.fromkeys([bare, full]):
        tokens = shlex.split(text)
        out.append([METAVARIABLES.get(t, t) for t in tokens])
    return out


def parse(tokens: list[str]) -> tuple[str, dict]:
    """(command path, parameters) as the real CLI parses `ecamp <tokens>`, without running it."""
    from flows.cli import app

    group = typer.main.get_command(app)
    path, command, rest = [], group, tokens
    while hasattr(command, "resolve_command"):  # a group (typer's own click)
        name, command, rest = command.resolve_command(command.context_class(command), rest)
        path.append(name)
    return " ".join(path), command.make_context(path[-1], list(rest)).params


def check_ecamp(tokens: list[str]) -> None:
    from tasks.config import load_config
    from tasks.pretrain_ecamp import ablation_rows
    from tasks.registry import get_stage

    command, params = parse(tokens)
    overrides = list(params.get("set_") or ())
    if params.get("config") is not None:
        load_config(REPO_ROOT / params["config"], overrides)  # every --set key and value
    elif overrides:
        load_config(REPO_ROOT / "configs" / "demo.yaml", overrides)
    for key in ("name", "until", "from_"):
        if command != "lineage" and params.get(key):
            get_stage(params[key])
    for stage in params.get("force") or () if command == "run" else ():
        get_stage(stage)
    if command == "ablate":
        ablation_rows(params["table"], list(params["rows"] or ()) or None)


def test_every_documented_command_is_checked_or_excused():
    deployment = {c for commands in README_COMMANDS.values() for c in commands}
    unchecked = []
    for doc, command in documented():
        bare = re.sub(r"^(\w+=\S+\s+)+", "", command)  # after the environment settings it starts with
        known = bare.startswith(("ecamp ", "make ", "prefect ")) or any(
            command.startswith(start) for start in NOT_HERE
        )
        if not known:
            unchecked.append(f"{doc}: {command}")
        if bare.startswith("prefect ") and doc == "README.md":
            assert any(command.startswith(d) or d.startswith(command) for d in deployment), (
                f"README's `{command}` is not among the commands tests/test_deployments.py runs"
            )
    assert not unchecked, "commands neither checked nor excused in NOT_HERE:\n" + "\n".join(unchecked)
    assert len(documented()) > 40  # the blocks were found at all


@pytest.mark.parametrize(
    "doc,command", [(d, c) for d, c in documented() if c.startswith("ecamp ")], ids=lambda v: v[:60]
)
def test_documented_ecamp_commands_parse_and_their_settings_exist(doc, command):
    for tokens in variants(command):
        try:
            check_ecamp(tokens[1:])
        except Exception as err:  # noqa: BLE001  (the CLI's, the config's, a stage's or a row's error)
            message = err.format_message() if hasattr(err, "format_message") else str(err)
            pytest.fail(f"{doc}: `{' '.join(tokens)}`: {type(err).__name__}: {message}")


def test_documented_make_targets_exist():
    targets = sorted({c.split()[1] for _, c in documented() if c.startswith("make ")})
    assert "demo" in targets and "test-all" in targets
    for target in targets:
        done = subprocess.run(["make", "-n", target], cwd=REPO_ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"make {target}: {done.stderr}"


def test_a_wrong_setting_or_row_in_a_command_would_fail_the_check():
    """The checks can fail: what an out-of-date README line looks like to them."""
    with pytest.raises(Exception, match="no_sr"):
        check_ecamp(shlex.split("ablate --table 7 -c configs/paper.yaml --row no_sr"))
    with pytest.raises(Exception, match="max_retry_after_seconds"):
        check_ecamp(
            shlex.split(
                "stage seed_distill -c configs/demo.yaml --set seed_distill.max_retry_after_seconds=3"
            )
        )
    with pytest.raises(Exception, match="No such option: --rows"):
        check_ecamp(shlex.split("ablate --table 7 -c configs/paper.yaml --rows no_rf"))
