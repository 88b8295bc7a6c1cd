"""The README's command lines, as written: every option a `dlp-deploy ...` line names exists in that command's
--help, every concrete line parses, and the prune / streamline / recover examples run end to end on a tiny random
model standing in for smollm2-135m and for the run folders they name."""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

README = Path(__file__).resolve().parents[1] / "README.md"
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# a usage synopsis, not a command to run: optional parts, alternatives, elisions
SYNOPSIS = ("[", "|", "…", "...")
# the examples that run on a tiny model in seconds; the rest (fetch, search, eval, export, bench, sweep) need
# real models, engines or minutes, and are parsed only
RUNNABLE = ("prune", "streamline", "recover")
MODEL_NAMES = ("MODEL", "smollm2-135m")  # stand-ins for the model a line starts from


@dataclass(frozen=True)
class Line:
    number: int  # README line of the command's first line
    text: str  # continuations joined
    notes: tuple[str, ...]  # indented `# ...` lines right below it: more of its synopsis

    @property
    def args(self) -> list[str]:
        return shlex.split(self.text, comments=True)[1:]  # without `dlp-deploy`

    @property
    def synopsis(self) -> bool:
        return any(mark in self.text.split(" #")[0] for mark in SYNOPSIS)


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) inside fenced code blocks, indented fences (in list items) included."""
    inside, out = False, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            inside = not inside
        elif inside:
            out.append((number, line))
    return out


def readme_commands(text: str) -> list[Line]:
    """Every `dlp-deploy ...` line of a code block, `\\` continuations joined, with its indented comment lines."""
    lines, out, i = code_lines(text), [], 0
    while i < len(lines):
        number, line = lines[i]
        command = line.strip()
        if command.startswith("dlp-deploy "):
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1].rstrip() + " " + lines[i][1].strip()
            notes = []
            while i + 1 < len(lines) and lines[i + 1][1].startswith((" ", "\t")) and \
                    lines[i + 1][1].strip().startswith("#"):
                i += 1
                notes.append(lines[i][1].strip())
            out.append(Line(number, command, tuple(notes)))
        i += 1
    return out


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


# typer (0.29) carries its own copy of click: commands are recognised by what they do, not by click's classes

@pytest.fixture(scope="module")
def app() -> typer.Typer:
    from dlp_deploy import cli as module

    if not module.app.registered_commands:
        module._mount()
    return module.app


@pytest.fixture(scope="module")
def cli(app):
    return typer.main.get_command(app)


def subcommand(group, args: list[str]) -> tuple[object, list[str], list[str]]:
    """(the command a line calls, its name path, the arguments after it): `models fetch` is two levels deep."""
    command, path = group, []
    while hasattr(command, "get_command"):  # a group
        name = args[len(path)]
        command = command.get_command(typer.Context(group), name)
        assert command is not None, f"no command {' '.join(path + [name])}"
        path.append(name)
    return command, path, args[len(path):]


def option_names(command) -> set[str]:
    return {name for p in command.params if p.param_type_name == "option" for name in p.opts + p.secondary_opts}


def named_options(line: Line, cli) -> list[tuple[str, str, object]]:
    """(where, option, command it must belong to) for every --option on the line and in its notes; a note that
    names another command (`# then: dlp-deploy prune ...`) is checked against that one."""
    command, path, _ = subcommand(cli, line.args)
    found = [(line.text, option, command) for option in OPTION.findall(line.text.split(" #")[0])]
    for note in line.notes:
        other = note.split("dlp-deploy ", 1)
        target = subcommand(cli, other[1].split())[0] if len(other) == 2 else command
        found += [(note, option, target) for option in OPTION.findall(note)]
    return found


def test_the_readme_has_commands():
    names = {c.args[0] for c in COMMANDS}
    assert {"prune", "streamline", "recover", "export", "sweep"} <= names and len(COMMANDS) > 20


@pytest.mark.parametrize("line", COMMANDS, ids=lambda c: f"L{c.number}")
def test_every_option_exists(line, cli):
    missing = [f"{option} ({' '.join(subcommand(cli, line.args)[1])})" for _where, option, command in
               named_options(line, cli) if option not in option_names(command)]
    assert not missing, f"README line {line.number} names options the command lacks: {missing}"


@pytest.mark.parametrize("line", [c for c in COMMANDS if not c.synopsis], ids=lambda c: f"L{c.number}")
def test_concrete_lines_parse(line, cli):
    """Up to argument parsing: types, choices, required options, the argument count (nothing runs)."""
    command, path, rest = subcommand(cli, line.args)
    try:
        command.make_context(" ".join(path), list(rest))
    except Exception as exc:  # click's UsageError and its kin
        pytest.fail(f"README line {line.number} does not parse: {getattr(exc, 'format_message', exc.__str__)()}")


# ---------------------------------------------------------------- the examples that run

@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on busy cores their spin-waits cost much more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def substituted(args: list[str], model: Path, runs: Path) -> list[str]:
    """The line's arguments with the tiny model for the model it names and run folders under `runs`."""
    out = []
    for arg in args:
        if arg in MODEL_NAMES:
            arg = str(model)
        elif arg.startswith("runs/"):
            arg = str(runs / arg.removeprefix("runs/"))
        out.append(arg)
    return out


def test_runnable_examples_run_as_written(app, tmp_path, data_root, monkeypatch, one_thread):
    """In README order (recover reads the folder the prune example wrote), each with its own defaults: an 8-layer
    tiny LLaMA (so that `--remove-layers 6` leaves layers) with a 128-token context (the windows), the shipped
    offline data."""
    from dlp_deploy.testing import save_tiny

    monkeypatch.setenv("DLP_DEPLOY_DATA", str(data_root))
    model = save_tiny(tmp_path / "tiny", num_hidden_layers=8, max_position_embeddings=128)
    runnable = [c for c in COMMANDS if not c.synopsis and c.args[0] in RUNNABLE]
    assert {c.args[0] for c in runnable} == set(RUNNABLE)
    for line in runnable:
        args = substituted(line.args, model, tmp_path / "runs") + ["--device", "cpu"]
        result = CliRunner().invoke(app, args, catch_exceptions=True)
        detail = result.output + (repr(result.exception) if result.exception else "")
        assert result.exit_code == 0, f"README line {line.number} ({line.text}) failed: {detail[-2000:]}"
    written = {p.name for p in (tmp_path / "runs").iterdir()}
    assert {"dlp70", "dlp70-recovered", "s30"} <= written, written
    recovery = json.loads((tmp_path / "runs" / "dlp70-recovered" / "recovery.json").read_text())
    assert recovery["perplexity"]["windows"] == 16  # the default held-out windows fit the shipped data
    assert json.loads((tmp_path / "runs" / "s30" / "pruning.json").read_text())["settings"]["importance"] == "taylor"
