"""A sharded HF checkpoint (model-0000k-of-0000n.safetensors + model.safetensors.index.json, as big models ship)
loads straight into ZeRO-3 partitions: under a live stage-3 HfDeepSpeedConfig, `load_model` builds placeholder
parameters (numel 0, the real size in ds_numel), and gathering them gives exactly the tensors of the shards, tied
embeddings one parameter, as a plain load of the same files gives them (Qwen2-MoE: transformers fuses the
checkpoint's per-expert tensors into 3-D ones on the way). The model fingerprint covers every shard and the index."""

from __future__ import annotations

import json

import pytest
import torch
from families import build_family
from train_helpers import export_weights, launcher_env_dropped, process_group  # noqa: F401

from midpo.config import ModelConfig
from midpo.runtime.models import load_model, model_fingerprint

pytestmark = pytest.mark.usefixtures("process_group", "launcher_env_dropped")


@pytest.mark.parametrize("name", ["qwen2.5", "qwen2-moe"])  # tied embeddings; 3-D expert tensors
def test_sharded_checkpoint_loads_into_zero3_partitions(tmp_path, name):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    path = build_family(name, tmp_path / name, max_shard_size="32KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert len(export_weights(path)) > 0
    want = dict(load_model(path, ModelConfig(dtype="fp32")).named_parameters())  # a plain load of the same files
    keep = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})  # noqa: F841
    model = load_model(path, ModelConfig(dtype="fp32", attn_implementation="auto"), train=True)
    del keep
    params = dict(model.named_parameters())
    assert all(p.numel() == 0 and p.ds_numel > 0 for p in params.values())  # partitioned, never whole
    assert set(params) == set(want)  # the tied head is the embedding's parameter, not one of its own
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == model.config.tie_word_embeddings == (name == "qwen2.5")
    for key, p in params.items():
        with deepspeed.zero.GatheredParameters([p]):
            torch.testing.assert_close(p.data, want[key], atol=0, rtol=0, msg=key)


def test_fingerprint_covers_every_shard_and_the_index(tmp_path):
    path = build_family("llama3", tmp_path / "m", max_shard_size="32KB")
    before = model_fingerprint(path)
    last = sorted(path.glob("model-*.safetensors"))[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 1
    last.write_bytes(bytes(data))
    assert model_fingerprint(path) != before
