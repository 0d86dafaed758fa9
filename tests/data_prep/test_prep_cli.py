"""`midpo synth` / `midpo prep` through the real CLI router."""

from __future__ import annotations

import dataclasses
import json

import pytest
from prep_helpers import write_jsonl

from pipeline import cli
from pipeline.config import DataConfig, load_config


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
        assert f"data.{f.name}:" in text, f.name  # with its help text
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
