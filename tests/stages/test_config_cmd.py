"""`midpo config show|list` and the pointer to it in every stage's --help, through the real CLI router."""

from __future__ import annotations

import json

import pytest

from midpo import cli
from midpo.config import DS_CONFIGS_DIR, RECIPES_DIR, TrainConfig, field_help, load_config, to_dict


def test_config_show_is_a_recipe_that_reads_back(tmp_path, capsys):
    argv = ["config", "show", "tiny", "train.lr=2e-5", "loss.prior=simpo", "run_dir=/tmp/elsewhere"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    shown = tmp_path / "shown.yaml"
    shown.write_text(out)
    want = load_config("tiny", ["train.lr=2e-5", "loss.prior=simpo", "run_dir=/tmp/elsewhere"])
    assert load_config(shown) == want
    assert f"recipe {RECIPES_DIR / 'tiny.yaml'} + train.lr=2e-5" in out.splitlines()[0]  # names what it resolved
    assert f"# {field_help(TrainConfig)['micro_batch_size']}\n  micro_batch_size: 8" in out
    assert "# == prior_net: The learnable token-level prior network" in out  # section headers


def test_config_show_without_a_recipe_shows_the_defaults(capsys):
    assert cli.main(["config", "show", "--keys-only"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "train.lr=5.0e-07" in lines and "synth.tasks=[sort, reverse, dedupe]" in lines
    assert load_config(None, lines) == load_config(None)


def test_config_show_json(capsys):
    assert cli.main(["config", "show", "tiny", "--json", "sft.steps=3"]) == 0
    assert json.loads(capsys.readouterr().out) == to_dict(load_config("tiny", ["sft.steps=3"]))


@pytest.mark.parametrize("argv, message", [
    (["config", "show", "no_such_recipe"], "recipe no_such_recipe not found"),
    (["config", "show", "tiny", "train.lrr=1"], "unknown config key(s) train.lrr"),
])
def test_config_show_user_error_is_one_line(capsys, argv, message):
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("midpo config: error: ") and message in err and err.count("\n") == 1


def test_config_list_names_every_shipped_file(capsys):
    assert cli.main(["config", "list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    shipped = sorted(RECIPES_DIR.glob("*.yaml")) + sorted(DS_CONFIGS_DIR.glob("*.json"))
    assert shipped and sorted(lines) == sorted(p.stem for p in shipped)
    assert "The embedded tiny default" in lines["tiny"]  # the recipe's own leading comment
    assert lines["zero3_offload"].split(None, 1)[1] == "ZeRO stage 3, bf16, offloads optimizer and param to cpu"
    assert lines["zero0_cpu_fp32"].split(None, 1)[1] == "ZeRO stage 0, fp32"


@pytest.mark.parametrize("command", [c for c in cli.COMMANDS if c != "config"])
def test_every_stage_help_points_to_config_show(capsys, command):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "`midpo config show RECIPE` prints the resolved config with each key's help" in text
    assert "key.sub=value" in text
