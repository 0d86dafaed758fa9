from pathlib import Path

import pytest
import yaml

from midpo.config import RECIPES_DIR, Config, ConfigError, load_config
from midpo.runtime.files import save_config


def test_every_shipped_recipe_loads():
    recipes = sorted(RECIPES_DIR.glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for r in recipes:
        cfg = load_config(r)
        assert isinstance(cfg, Config)


def test_override_precedence_and_types(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lr: 1.0e-5\n  micro_batch_size: 4\nloss:\n  prior: simpo\n")
    cfg = load_config(p, ["train.lr=3e-4", "loss.options.gamma_beta_ratio=0.5", "run_dir=/x/y"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.micro_batch_size == 4  # from YAML
    assert cfg.train.grad_accum == 1  # default
    assert cfg.loss.prior == "simpo"
    assert cfg.loss.options == {"gamma_beta_ratio": 0.5}
    assert cfg.run_dir == "/x/y"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        load_config(None, ["train.lrr=1"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size"):
        load_config(None, ["train.micro_batch_size=abc"])


def test_contradiction_rejected():
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        load_config(None, ["data.max_prompt_tokens=600", "data.max_length=512"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("tiny", ["train.lr=2e-5"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert not Path(str(out) + ".tmp").exists()
    again = load_config(out)
    assert again == cfg
    assert yaml.safe_load(out.read_text())["train"]["lr"] == pytest.approx(2e-5)
