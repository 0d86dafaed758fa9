"""`midpo synth` / `midpo prep` through the real CLI router."""

from __future__ import annotations

import dataclasses
import json

import pytest
from prep_helpers import write_jsonl

from midpo import cli
from midpo.config import DataConfig, field_help, load_config


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_prep_help_documents_every_option(capsys):
    text = _help(capsys, "prep")
    for f in dataclasses.fields(DataConfig):
        if f.name == "inputs":
            assert "INPUT" in text and "data.inputs" in text
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert f"data.{f.name}:" in text, f.name  # with its help text, from the field's metadata (midpo/config.py)
        assert "".join(field_help(DataConfig)[f.name].split()) in "".join(text.split()), f.name
    for opt in ("--config", "--out", "--no-dedup", "auto,standard,conversational,implicit,hh"):
        assert opt in text


def test_synth_help(capsys):
    text = _help(capsys, "synth")
    assert "--out" in text and "--config" in text and "n_pairs" in text


def test_cli_synth_then_prep_from_recipe(tmp_path, capsys):
    run_dir = tmp_path / "run"
    small = ["synth.n_pairs=60", "synth.n_eval_prompts=5", "synth.hidden_size=16", "synth.intermediate_size=32",
             "synth.num_layers=1", "synth.num_heads=2", "synth.num_kv_heads=1"]
    assert cli.main(["synth", "--config", "tiny", f"run_dir={run_dir}", *small]) == 0
    assert (run_dir / "synth" / "model" / "model.safetensors").exists()
    assert len((run_dir / "synth" / "pairs.jsonl").read_text().splitlines()) == 60
    # recipe defaults: inputs <run_dir>/synth/pairs.jsonl, tokenizer <run_dir>/synth/model, out <run_dir>/data;
    # precedence: recipe (eval_fraction 0.1) < override (0.3) < explicit option (--eval-fraction 0.5)
    assert cli.main(["prep", "--config", "tiny", f"run_dir={run_dir}", "data.eval_fraction=0.3",
                     "--max-length", "120", "--no-dedup"]) == 0
    m = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert m["settings"]["eval_fraction"] == 0.3 and m["settings"]["max_length"] == 120
    tiny = load_config("tiny")
    assert m["settings"]["max_prompt_tokens"] == tiny.data.max_prompt_tokens  # from tiny.yaml
    assert m["settings"]["dedup"] is False and tiny.data.dedup is True  # the flag wins over the recipe
    assert m["rows"]["read"] == 60
    assert m["tokenizer"]["path"] == str(run_dir / "synth" / "model")
    out = capsys.readouterr().out
    assert "train" in out and "fingerprint" in out


def test_cli_prep_explicit_paths_and_errors(tmp_path, tok_dir, capsys):
    f = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "sort: 2 1", "chosen": "1 2", "rejected": "2 1"}])
    assert cli.main(["prep", str(f), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o"),
                     "--eval-fraction", "0"]) == 0
    assert (tmp_path / "o" / "manifest.json").exists()
    capsys.readouterr()
    assert cli.main(["prep", str(tmp_path / "missing.jsonl"), "--tokenizer", str(tok_dir),
                     "--out", str(tmp_path / "o2")]) == 1
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    assert cli.main(["prep", str(f), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o3"),
                     "--max-prompt-tokens", "600"]) == 1
    assert "max_prompt_tokens must be smaller" in capsys.readouterr().err


def _prep(src, tok_dir, out, *more) -> int:
    return cli.main(["prep", str(src), "--tokenizer", str(tok_dir), "--out", str(out), "--eval-fraction", "0",
                     "--max-prompt-tokens", "64", *more])


def test_prep_replaces_only_folders_it_wrote(tmp_path, tok_dir, capsys):
    """--out naming a user's folder, or the folder of the input itself, is refused (exit 1, the folder as it was);
    an empty folder is accepted, and a re-run replaces midpo's own previous output."""
    f = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "sort: 2 1", "chosen": "1 2", "rejected": "2 1"}])
    user = tmp_path / "important"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert _prep(f, tok_dir, user) == 1
    err = capsys.readouterr().err
    assert f"midpo prep: error: output folder {user} exists and was not written by midpo" in err
    assert [p.name for p in user.iterdir()] == ["notes.txt"] and (user / "notes.txt").read_text() == "mine"

    in2 = tmp_path / "in2"
    in2.mkdir()
    own_input = write_jsonl(in2 / "pairs.jsonl", [{"prompt": "sort: 3 1", "chosen": "1 3", "rejected": "3 1"}])
    before = own_input.read_bytes()
    assert _prep(own_input, tok_dir, in2) == 1
    assert f"output folder {in2} contains the input {own_input}" in capsys.readouterr().err
    assert list(in2.iterdir()) == [own_input] and own_input.read_bytes() == before

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _prep(f, tok_dir, empty) == 0
    first = json.loads((empty / "manifest.json").read_text())
    assert _prep(f, tok_dir, empty, "--max-length", "100") == 0  # a changed setting: rebuilt in place
    second = json.loads((empty / "manifest.json").read_text())
    assert second["fingerprint"] != first["fingerprint"] and second["settings"]["max_length"] == 100
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_prep_refuses_max_length_over_the_models_positions(tmp_path, tiny_default, capsys):
    """The tiny model has 256 positions: a max_length of 300 could never be trained on whole. Refused when the
    tokenizer folder is the model folder, or when the recipe names the model."""
    f = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "sort: 2 1", "chosen": "1 2", "rejected": "2 1"}])
    model = tiny_default["model"]
    assert _prep(f, model, tmp_path / "o1", "--max-length", "300") == 1
    err = capsys.readouterr().err
    assert f"data.max_length is 300 tokens, but the model {model} has max_position_embeddings=256" in err
    assert "Lower data.max_length to at most 256" in err
    assert _prep(f, tiny_default["tokenizer"], tmp_path / "o2", "--max-length", "300", f"model.policy={model}") == 1
    assert "max_position_embeddings=256" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert _prep(f, model, tmp_path / "o3", "--max-length", "256") == 0
