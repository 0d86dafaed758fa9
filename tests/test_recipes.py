"""Every shipped recipe (midpo/recipes/*.yaml) loads, validates and resolves its DeepSpeed config, including the
production ones that cannot run here (Llama-3-8B / Qwen2.5-7B on UltraFeedback with zero3_bf16 + flash-attn,
Llama-3-70B with ZeRO-3 offload): on 8 GPUs x 1, 2 and 4 nodes the global batch is micro x accum x GPUs, the
precision matches model.dtype, no "auto" is left, the loss and its links build, the export shard size parses,
and the config reads back equal from `midpo config show`'s YAML."""

from __future__ import annotations

import pytest

from midpo.config import RECIPES_DIR, load_config, parse_size, render_config
from midpo.core.losses import link_terms
from midpo.core.priors import build_prior
from midpo.runtime.ds_config import resolve_ds_config

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
PRODUCTION = {"llama3_8b_ultrafeedback": (4096, "zero3_bf16"), "qwen2.5_7b_ultrafeedback": (3584, "zero3_bf16"),
              "llama3_70b_offload_ultrafeedback": (8192, "zero3_offload"),
              "llama3_8b_midpo_ultrafeedback": (4096, "zero3_bf16")}


def test_the_production_recipes_are_shipped():
    assert set(PRODUCTION) <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_validates_and_resolves_its_ds_config(name, tmp_path):
    cfg = load_config(name)  # every section's own validation (__post_init__) runs here
    link_terms(cfg.loss)
    build_prior(cfg.loss)
    assert parse_size(cfg.export.max_shard_size, "export.max_shard_size") > 0
    out = tmp_path / "shown.yaml"
    out.write_text(render_config(cfg))
    assert load_config(out) == cfg
    hidden = PRODUCTION.get(name, (64, None))[0]
    for world in (8, 16, 32):
        ds = resolve_ds_config(cfg, world, hidden)
        tc = cfg.train
        assert ds["train_batch_size"] == tc.micro_batch_size * tc.grad_accum * world
        assert ds["train_micro_batch_size_per_gpu"] == tc.micro_batch_size
        assert ds["gradient_accumulation_steps"] == tc.grad_accum
        assert ds.get("bf16", {}).get("enabled", False) == (cfg.model.dtype == "bf16")
        assert ds["optimizer"]["params"]["lr"] == tc.lr


@pytest.mark.parametrize("name", sorted(PRODUCTION))
def test_production_recipes_are_zero3_bf16_flash_attention(name):
    cfg = load_config(name)
    hidden, ds_name = PRODUCTION[name]
    assert cfg.train.ds_config == ds_name and cfg.model.dtype == "bf16"
    assert cfg.model.attn_implementation == "flash_attention_2" and cfg.model.gradient_checkpointing
    gpus = 8 * (4 if ds_name == "zero3_offload" else 2)  # the node counts the recipes' comments plan for
    ds = resolve_ds_config(cfg, gpus, hidden)
    zo = ds["zero_optimization"]
    assert zo["stage"] == 3
    assert ("offload_param" in zo and "offload_optimizer" in zo) == (ds_name == "zero3_offload")
    assert ds["train_batch_size"] == 128


def test_the_learned_prior_recipe_is_mi_dpo_on_ultrafeedbacks_test_split():
    """Issue #23's real-scale recipe: the learned prior (its own DeepSpeed config resolves at the planned scale,
    with the prior's lr and no weight decay), reward accuracy on test_prefs (the eval split, not a fraction of
    train), and the generation eval's reward-model rollout settings."""
    from midpo.train.prior_engine import prior_ds_config

    cfg = load_config("llama3_8b_midpo_ultrafeedback")
    assert cfg.loss.prior == "learned" and build_prior(cfg.loss).needs.prior_network
    assert cfg.prior_net.objective == "marginal" and not cfg.prior_net.condition_on_prompt
    assert 0 < cfg.prior_net.num_layers < 32  # a truncated copy of Llama-3-8B's 32 layers
    assert cfg.data.split == "train_prefs" and cfg.data.eval_split == "test_prefs"
    assert cfg.iterate.labeller == "reward_model" and cfg.iterate.reward_model and cfg.iterate.prompts
    ds = prior_ds_config(cfg, 16, 4096)
    assert ds["optimizer"]["params"]["lr"] == cfg.prior_net.lr != cfg.train.lr
    assert ds["optimizer"]["params"].get("weight_decay", 0.0) == 0.0
    assert ds["zero_optimization"]["stage"] == cfg.prior_net.zero_stage
    assert ds["train_batch_size"] == 128
