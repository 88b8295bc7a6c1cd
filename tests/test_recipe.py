"""`dlp-deploy sweep --recipe FILE` (issue 26): a run.json, or a TOML file with the same [settings] table, replays
a sweep's settings; options given on the command line override the recipe's; unknown keys are refused in one line.
On the settings level: run_sweep is replaced by a stub, so nothing is pruned or measured."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dlp_deploy.errors import UserError
from dlp_deploy.pipeline.levels import SweepSettings
from dlp_deploy.pipeline.sweep import read_recipe, run_record

# windows given, so that no model config is read to resolve them; the model is never loaded
OPTIONS = ["--sparsities", "0.5,0.7", "--allocation", "dlp", "--baseline", "uniform,owl", "--engines",
           "onnxruntime", "--calib-seqlen", "32", "--eval-seqlen", "64", "--cores", "1", "--rounds", "2",
           "--precision", "fp32,int8", "--pattern", "unstructured,2:4", "--max-windows", "2"]


@pytest.fixture(scope="module")
def app():
    from dlp_deploy import cli

    if not cli.app.registered_commands:
        cli._mount()
    return cli.app


@pytest.fixture
def sweep_of(app, monkeypatch, tmp_path):
    """args -> (the SweepSettings `dlp-deploy sweep ARGS` would run, the recipe record it would write)."""
    import dlp_deploy.commands.sweep as command

    def run(*args):
        seen = {}

        def stub(settings, out, progress=None, log=print, recipe=None, **_):
            seen.update(settings=settings, recipe=recipe)

        monkeypatch.setattr(command, "run_sweep", stub)
        result = CliRunner().invoke(app, ["sweep", *map(str, args)], catch_exceptions=True)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code == 0, result.output
        return seen["settings"], seen["recipe"]

    return run


def _run_json(folder: Path, settings: SweepSettings, recipe: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.json"
    path.write_text(json.dumps(run_record(settings, recipe)))
    return path


def test_a_run_json_replays_the_settings_the_command_line_built(sweep_of, tmp_path):
    built, recipe = sweep_of("some-model", *OPTIONS, "--out", tmp_path / "a")
    assert recipe is None and built.prune.allocations == ["dlp", "uniform", "owl"]
    assert built.prune.patterns == ["unstructured", "2:4"] and built.precisions == ["fp32", "int8"]
    replayed, record = sweep_of("--recipe", _run_json(tmp_path / "a", built), "--out", tmp_path / "b")
    assert replayed == built
    assert record == {"file": str((tmp_path / "a" / "run.json").resolve()), "overridden": []}
    # the new run.json names the recipe it came from, and is itself a recipe of the same settings
    again, _ = sweep_of("--recipe", _run_json(tmp_path / "b", replayed, record), "--out", tmp_path / "c")
    assert again == built


def test_options_on_the_command_line_override_the_recipe(sweep_of, tmp_path):
    built, _ = sweep_of("some-model", *OPTIONS, "--out", tmp_path / "a")
    path = _run_json(tmp_path / "a", built)
    replayed, record = sweep_of("--recipe", path, "--out", tmp_path / "b", "--rounds", "5", "--engines",
                                "deepsparse,onnxruntime", "--baseline", "none", "other-model")
    assert replayed.to_flat() == {**built.to_flat(), "rounds": 5, "engines": ["deepsparse", "onnxruntime"],
                                  "allocations": ["dlp"], "model": "other-model"}
    assert record["overridden"] == ["allocations", "engines", "model", "rounds"]
    # an option left at its default does not override: the recipe's 2 rounds stand
    assert sweep_of("--recipe", path, "--out", tmp_path / "c")[0].rounds == 2


def test_a_toml_recipe_is_the_same_settings_table(sweep_of, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[settings]\nmodel = "some-model"\nsparsities = [0.5, 0.7]\nallocations = ["dlp", "uniform", '
                      '"owl"]\nengines = ["onnxruntime"]\ncalib_seqlen = 32\neval_seqlen = 64\ncores = 1\n'
                      'rounds = 2\nprecisions = ["fp32", "int8"]\npatterns = ["unstructured", "2:4"]\n'
                      'max_windows = 2\n')
    from_toml, _ = sweep_of("--recipe", recipe, "--out", tmp_path / "t")
    built, _ = sweep_of("some-model", *OPTIONS, "--out", tmp_path / "a")
    assert from_toml == built  # keys the recipe leaves out take the command line's defaults


@pytest.mark.parametrize("text, words", [
    ('[settings]\nmodel = "m"\nsparsity = [0.5]\n', ["unknown setting", "sparsity"]),
    ('[settings]\nmodel = "m"\nrounds = "three"\n', ["rounds", "three", "int"]),
    ('[settings]\nmodel = "m"\nsparsities = [0.5, "x"]\n', ["sparsities"]),
    ('[setting]\nmodel = "m"\n', ["no [settings] table"]),
    ('settings = 3\n', ["no [settings] table"]),
    ('[settings]\nmodel = "m"\n[bench]\nruns = 3\n', ["unknown key", "bench"]),
    ('[settings\n', ["not a readable recipe"]),
])
def test_a_bad_recipe_is_refused_in_one_line(tmp_path, text, words):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        read_recipe(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for w in words:
        assert w in message, message


def test_recipe_and_replicate_are_refused_together_and_a_recipe_needs_a_model(sweep_of, tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[settings]\nsparsities = [0.5]\ncalib_seqlen = 32\neval_seqlen = 64\n')
    with pytest.raises(UserError, match="names no model"):
        sweep_of("--recipe", path, "--out", tmp_path / "a")
    assert sweep_of("--recipe", path, "--out", tmp_path / "b", "given-model")[0].model == "given-model"
    with pytest.raises(UserError, match="not both"):
        sweep_of("--recipe", path, "--replicate", tmp_path, "--out", tmp_path / "c")


def test_run_json_keeps_the_settings_and_the_recipe():
    settings = SweepSettings.from_flat(model="m", sparsities=[0.5])
    record = run_record(settings, {"file": "/x/run.json", "overridden": ["rounds"]})
    assert record["settings"] == settings.to_flat() and record["recipe"]["file"] == "/x/run.json"
    assert "recipe" not in run_record(settings) and record["provenance"]["versions"]


def test_every_committed_sweeps_flat_settings_compose_and_flatten_back():
    """The settings are composed of the stages' own (SweepSettings.prune, .calibration, .eval, .export, .bench);
    every committed sweep's flat settings read into them and come back out unchanged, so each stays a recipe."""
    root = Path(__file__).resolve().parents[1] / "reports"
    sweeps = [json.loads(p.read_text())["settings"] for p in sorted(root.glob("*/results.json"))
              if json.loads(p.read_text()).get("schema") == "dlp-deploy/sweep/1"]
    assert len(sweeps) >= 5
    for flat in sweeps:
        settings = SweepSettings.from_flat(flat)
        assert {k: v for k, v in settings.to_flat().items() if k in flat} == flat
        assert settings.calibration.seqlen == flat["calib_seqlen"] and settings.bench.runs == flat["runs"]
