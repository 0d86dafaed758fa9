import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from midpo.config import (
    RECIPES_DIR,
    Config,
    ConfigError,
    TrainConfig,
    field_help,
    knob,
    load_config,
    render_config,
    render_overrides,
)
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


def _sections() -> list[tuple[str, type]]:
    """("", Config) and (name, class) of every section: every level that holds keys."""
    cfg = Config()
    return [("", Config)] + [(f.name, type(getattr(cfg, f.name))) for f in dataclasses.fields(Config)
                             if dataclasses.is_dataclass(getattr(cfg, f.name))]


def test_every_key_has_help():
    sections = _sections()
    assert len(sections) > 5  # the sections were found (synth, data, model, ...)
    missing = [f"{name}.{key}" if name else key for name, cls in sections
               for key, text in field_help(cls).items() if not text.strip()]
    assert not missing, f"config keys without help (give them knob(default, 'help')): {missing}"
    for name, cls in sections[1:]:  # a section's help is its docstring, documented once
        assert field_help(Config)[name] == inspect.cleandoc(cls.__doc__)


def test_knob_refuses_an_empty_help():
    with pytest.raises(TypeError, match="help"):
        knob(1, "  ")
    f = knob(help="a list", factory=list)
    assert f.default_factory is list and f.metadata["help"] == "a list"


def _comment_blocks(text: str) -> dict[str, str]:
    """`section.key` -> the comment lines right above its `key:` line, joined (a rendered config's help)."""
    out, block, section = {}, [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped[1:].strip())
            continue
        if stripped and not stripped.startswith("-"):
            key = stripped.split(":", 1)[0]
            if line.startswith(" "):
                out[f"{section}.{key}"] = " ".join(block)
            else:
                section = key
                out[key] = " ".join(block)
        block = []
    return out


def test_rendered_config_reads_back_equal_with_each_keys_help(tmp_path):
    cfg = load_config("tiny", ["train.lr=2e-5", "loss.options.c=0.5", "loss.options.nested={a: [1, 2]}",
                               "model.policy=/some/folder"])
    # values YAML would misread unquoted: a comment marker, a colon, a newline, a number-looking string
    cfg.data.system_prompt = "You are: helpful # not a comment\nsecond line"
    cfg.prior_net.init = "1e-5"
    text = render_config(cfg)
    out = tmp_path / "shown.yaml"
    out.write_text(text)
    assert load_config(out) == cfg
    blocks = _comment_blocks(text)
    for name, cls in _sections():
        for key, help_text in field_help(cls).items():
            if name and key == "options":
                continue
            where = f"{name}.{key}" if name else key
            want = " ".join(help_text.split())
            if dataclasses.is_dataclass(getattr(cls(), key, None)):
                want = f"== {key}: {want}"  # a section's header (model.lora: a section inside a section)
            assert blocks[where].startswith(want), (where, blocks[where])
    # a value that differs from its default says so; an untouched one does not
    assert blocks["train.lr"].endswith("(default: 5.0e-07)")
    assert blocks["train.max_grad_norm"] == field_help(TrainConfig)["max_grad_norm"]


def test_rendered_overrides_rebuild_the_config():
    cfg = load_config("tiny", ["loss.options.r=0.1", "data.system_prompt='be brief: no prose'", "train.ds_config=a b"])
    lines = render_overrides(cfg)
    assert len(lines) == len({line.split("=", 1)[0] for line in lines})  # one line per key
    assert "train.lr=0.0003" in lines
    assert load_config(None, lines) == cfg


def test_train_layout_and_its_older_booleans():
    """train.layout (auto | packed | padded | shared); train.packing / train.share_prompt, when set, pick a layout as
    they did before it existed (share_prompt first); a contradiction is refused naming both."""
    assert load_config(None, []).train.layout == "auto"
    cases = {("train.packing=false",): "padded", ("train.packing=true",): "packed",
             ("train.share_prompt=false",): "packed", ("train.share_prompt=true", "train.packing=true"): "shared",
             ("train.layout=padded", "train.packing=false"): "padded", ("train.layout=shared",): "shared"}
    for overrides, layout in cases.items():
        assert load_config(None, list(overrides)).train.layout == layout, overrides
    with pytest.raises(ConfigError, match="train.layout=padded contradicts train.packing=true"):
        load_config(None, ["train.layout=padded", "train.packing=true"])
    with pytest.raises(ConfigError, match="train.layout=packed contradicts train.share_prompt=true"):
        load_config(None, ["train.layout=packed", "train.share_prompt=true"])
    with pytest.raises(ConfigError, match="train.layout must be one of auto, packed, padded, shared"):
        load_config(None, ["train.layout=flat"])
