"""ds_configs/*.json: every shipped config resolves; "auto" filled in one place; contradictions refused."""

from __future__ import annotations

import json

import pytest
import torch

from midpo.config import DS_CONFIGS_DIR, ConfigError, load_config
from midpo.runtime.ds_config import _walk, inference_ds_config, resolve_ds_config

SHIPPED = sorted(p.stem for p in DS_CONFIGS_DIR.glob("*.json"))


def test_the_required_configs_ship():
    assert {"zero3_bf16", "zero3_offload", "zero3_cpu_fp32", "zero2_bf16", "zero2_cpu_fp32",
            "zero0_cpu_fp32"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_resolves(name):
    raw = json.loads((DS_CONFIGS_DIR / f"{name}.json").read_text())
    dtype = "bf16" if raw.get("bf16", {}).get("enabled") else "fp32"
    cfg = load_config(None, [f"train.ds_config={name}", f"model.dtype={dtype}", "train.micro_batch_size=3",
                             "train.grad_accum=5", "train.lr=2e-5", "train.max_grad_norm=0.5"])
    ds = resolve_ds_config(cfg, world_size=4, hidden_size=64)
    assert ds["train_batch_size"] == 3 * 5 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 0.5 and ds["optimizer"]["params"]["lr"] == 2e-5
    zo = ds["zero_optimization"]
    assert zo["stage"] == int(name[4])  # zero0_* / zero2_* / zero3_*
    # the stage's own bucket knobs are filled, the other stage's are not added
    assert ("stage3_prefetch_bucket_size" in zo) == (zo["stage"] == 3)
    assert ("allgather_bucket_size" in zo) == (zo["stage"] == 2)
    assert ("reduce_bucket_size" in zo) == (zo["stage"] in (2, 3))  # stage 0: DeepSpeed's own all-reduce buckets
    assert not [k for k, v in _walk(ds) if v == "auto"]
    if not torch.cuda.is_available() and not zo.get("offload_optimizer"):  # torch's fused CPU AdamW
        assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["fused"] is True
    # the frozen engines' (online reference, prior init) config: no optimizer; ZeRO-3 stays, ZeRO-2 -> 0
    inf = inference_ds_config(ds)
    assert "optimizer" not in inf and "optimizer" in ds
    assert inf["zero_optimization"]["stage"] == (3 if zo["stage"] == 3 else 0)
    assert inf["train_batch_size"] == ds["train_batch_size"]


def test_contradicting_batch_size_is_refused(tmp_path):
    p = tmp_path / "bad.json"
    raw = json.loads((DS_CONFIGS_DIR / "zero3_cpu_fp32.json").read_text())
    raw["train_batch_size"] = 7
    p.write_text(json.dumps(raw))
    cfg = load_config(None, [f"train.ds_config={p}", "model.dtype=fp32"])
    with pytest.raises(ConfigError, match="train_batch_size"):
        resolve_ds_config(cfg, world_size=2, hidden_size=64)


def test_dtype_mismatch_is_refused():
    cfg = load_config(None, ["train.ds_config=zero3_bf16", "model.dtype=fp32"])
    with pytest.raises(ConfigError, match="bf16"):
        resolve_ds_config(cfg, world_size=1, hidden_size=64)


@pytest.mark.parametrize(("name", "dtype"), [("zero3_cpu_fp32", "fp32"), ("zero3_bf16", "bf16")])
def test_compile_with_zero3_is_refused(name, dtype):
    cfg = load_config(None, [f"train.ds_config={name}", f"model.dtype={dtype}", "train.compile=true"])
    with pytest.raises(ConfigError, match="train.compile needs ZeRO stage <= 2"):
        resolve_ds_config(cfg, world_size=2, hidden_size=64)
    ok = load_config(None, ["train.ds_config=zero2_cpu_fp32", "model.dtype=fp32", "train.compile=true"])
    assert resolve_ds_config(ok, world_size=2, hidden_size=64)["zero_optimization"]["stage"] == 2


def test_prior_config_gets_its_own_stage_knobs():
    """prior_net.zero_stage differs from the policy's JSON: the prior's config carries that stage's bucket
    knobs, and the policy's train.compile (stage <= 2 only) does not apply to the uncompiled prior."""
    from midpo.train.prior_engine import prior_ds_config

    cfg = load_config(None, ["train.ds_config=zero2_cpu_fp32", "model.dtype=fp32", "train.compile=true",
                             "prior_net.zero_stage=3", "prior_net.lr=3e-4"])
    zo = prior_ds_config(cfg, 2, 64)["zero_optimization"]
    assert zo["stage"] == 3 and "stage3_prefetch_bucket_size" in zo and "allgather_bucket_size" not in zo
    cfg = load_config(None, ["train.ds_config=zero3_cpu_fp32", "model.dtype=fp32", "prior_net.zero_stage=2"])
    ds = prior_ds_config(cfg, 2, 64)
    assert ds["zero_optimization"]["stage"] == 2 and "stage3_prefetch_bucket_size" not in ds["zero_optimization"]
    assert ds["optimizer"]["params"]["lr"] == cfg.prior_net.lr and ds["optimizer"]["params"]["weight_decay"] == 0.0


def test_unknown_config_names_the_shipped_ones():
    cfg = load_config(None, ["train.ds_config=nope"])
    with pytest.raises(ConfigError, match="zero3_cpu_fp32"):
        resolve_ds_config(cfg, world_size=1, hidden_size=64)


@pytest.mark.parametrize("n_max", [5, 1024, 1025, 3000, 4097])
def test_equal_chunk_size_gives_every_rank_the_same_chunk_count(n_max):
    """Ranks with different response-token counts must call the output head the same number of times."""
    import math

    from midpo.runtime.engine import equal_chunk_size

    k = math.ceil(n_max / 1024)
    for n in range(max(1, n_max - 300), n_max + 1):
        c = equal_chunk_size(n, n_max, 1024)
        assert len(range(0, n, c)) == k and c <= 1024 or k == 1
