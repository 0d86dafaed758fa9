"""Every model family (tests/support/families.py) through every stage: prep (in this process) -> ref (2 processes)
-> train (ZeRO-3, 2 processes, 3 steps, export at the end) -> `midpo export` from the checkpoint (sharded) ->
AutoModelForCausalLM / AutoTokenizer.from_pretrained + generate.

CI time: ref and train of all families run in ONE torchrun launch (tests/support/family_pipeline.py), so the
interpreter and import start-up is paid once, not 14 times. Each policy is saved as sharded safetensors with an
index (64KB shards), so stage 2 and ZeRO-3 training load a sharded checkpoint; the probe passing proves they
loaded the same weights.

Checked per family: the chat template's prompt/response boundary for every prepared row (independently
re-rendered and re-tokenized here); the cached reference log-probs equal a plain HF forward (2e-5, fp32); the
start-of-run probe passed; step 1's DPO loss is ln 2 (policy == reference before the first update, 1e-5); the
exports (train's and `midpo export`'s, sharded with an index) hold the same weights, the family's config class,
generation config and tokenizer (chat template included), tied embeddings stay tied, and the folder generates."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from families import FAMILIES, NAMES, build_family, preference_rows
from train_helpers import REPO, clean_env, export_weights, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SHARD = "64KB"


def recipe(root: Path, name: str) -> Path:
    text = f"""run_dir: {root / 'run'}
data:
  inputs: [{root / 'pairs.jsonl'}]
  format: conversational
  max_prompt_tokens: 64
  max_length: 128
  eval_fraction: 0.2
model:
  policy: {root / 'model'}
  dtype: fp32
  attn_implementation: auto
ref:
  rows_per_shard: 64
  micro_batch_tokens: 256
loss:
  prior: dpo
  beta: 0.1
train:
  micro_batch_size: 2
  grad_accum: 1
  max_steps: 3
  lr: 1.0e-2
  warmup_ratio: 0.0
  ds_config: zero3_cpu_fp32
  peak_flops: 1.0e11
  probe_rows: 4
export:
  max_shard_size: {SHARD}
"""
    path = root / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from midpo.stages import export as export_stage
    from midpo.stages import prep

    base = tmp_path_factory.mktemp("families")
    recipes = {}
    for name in NAMES:
        root = base / name
        build_family(name, root / "model", max_shard_size=SHARD)
        rows = preference_rows(30, seed=1, system=FAMILIES[name].system)
        (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        recipes[name] = recipe(root, name)
        prep.run(argparse.Namespace(config=str(recipes[name]), out=None, overrides=[], inputs=[], force=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "support" / "family_pipeline.py"), *map(str, recipes.values())]
    proc = subprocess.run(cmd, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    for name, r in recipes.items():  # `midpo export`, one process, from the final ZeRO-3 checkpoint
        out = base / name / "export_cli"
        export_stage.run(argparse.Namespace(config=str(r), checkpoint="latest", out=str(out), overrides=[]))
    return {"base": base, "log": proc.stderr + proc.stdout, "rows": {n: preference_rows(30, seed=1,
            system=FAMILIES[n].system) for n in NAMES}}


def test_every_family_ran_ref_and_train_in_the_launch(pipeline):
    for name in NAMES:
        assert (pipeline["base"] / name / "run" / "export" / "config.json").exists(), name
    assert pipeline["log"].count("start-of-run probe passed") >= len(NAMES)


def _expected_response(tok, ends: set[int], full_ids: list[int], n_prompt: int) -> list[int]:
    """prep's documented rule (midpo/data/tokenization.py): the ids after the prompt, whitespace after the last end
    id (the tokenizer's EOS or the generation config's) cut, the tokenizer's EOS appended when none ends it."""
    resp = full_ids[n_prompt:]
    last = max((j for j, t in enumerate(resp) if t in ends), default=None)
    if last is not None and not tok.decode(resp[last + 1:]).strip():
        resp = resp[: last + 1]
    return resp if resp[-1] in ends else resp + [tok.eos_token_id]


@pytest.mark.parametrize("name", NAMES)
def test_template_boundary_holds_for_every_prepared_row(pipeline, name):
    from transformers import AutoTokenizer

    from midpo.runtime.prepared import load_split

    root = pipeline["base"] / name
    tok = AutoTokenizer.from_pretrained(str(root / "model"))
    ends = {tok.eos_token_id, *(tok.convert_tokens_to_ids(t) for t in FAMILIES[name].gen_eos)}
    want = {}
    for r in pipeline["rows"][name]:
        p = tok(tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"]
        sides = []
        for side in ("chosen", "rejected"):
            full = tok(tok.apply_chat_template(r["prompt"] + r[side], tokenize=False),
                       add_special_tokens=False)["input_ids"]
            assert full[: len(p)] == p, f"{name}: the prompt's ids are not a prefix of the conversation's"
            sides.append(_expected_response(tok, ends, full, len(p)))
            assert sides[-1][-1] == tok.convert_tokens_to_ids(FAMILIES[name].gen_eos[0])  # where generation stops
            assert r[side][0]["content"] in tok.decode(sides[-1])
        want[tuple(p)] = sides
    got = [row for split in ("train", "eval") for row in load_split(root / "run" / "data", split).to_list()]
    assert len(got) == len(want) == 30
    for row in got:
        assert [row["chosen_ids"], row["rejected_ids"]] == want[tuple(row["prompt_ids"])]


def _hf_logps(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = model(input_ids=ids, use_cache=False).logits[0].double().log_softmax(-1)
    return logp[torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1), torch.tensor(response)]


@pytest.mark.parametrize("name", NAMES)
def test_cached_reference_logps_equal_a_plain_hf_forward(pipeline, name):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from midpo.runtime.prepared import load_split

    root = pipeline["base"] / name
    model = AutoModelForCausalLM.from_pretrained(str(root / "model")).eval()  # HF's own default attention
    data = {r["id"]: r for r in load_split(root / "run" / "data", "train").to_list()}
    cache = load_from_disk(str(root / "run" / "ref" / "train"))
    assert len(cache) == len(data)
    for rec in cache.select(range(6)):
        row = data[rec["id"]]
        for side in ("chosen", "rejected"):
            want = _hf_logps(model, row["prompt_ids"], row[f"{side}_ids"])
            torch.testing.assert_close(torch.tensor(rec[f"{side}_ref_logps"], dtype=torch.float64), want,
                                       atol=2e-5, rtol=0, msg=f"{name} {side}")


@pytest.mark.parametrize("name", NAMES)
def test_step_one_dpo_loss_is_ln2(pipeline, name):
    recs = read_jsonl(pipeline["base"] / name / "run" / "logs" / "train_metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert all(math.isfinite(r["loss"]) for r in recs)
    if name == "qwen2-moe":  # the router's load-balancing loss trained with the model config's coefficient
        assert all(math.isfinite(r["router/aux_loss"]) and r["router/aux_loss"] > 0 for r in recs)
    else:
        assert "router/aux_loss" not in recs[0]


@pytest.mark.parametrize("name", NAMES)
def test_exports_reload_with_the_family_files_and_generate(pipeline, name):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from midpo.config import parse_size

    fam, root = FAMILIES[name], pipeline["base"] / name
    train_out, cli_out = root / "run" / "export", root / "export_cli"
    a, b = export_weights(train_out), export_weights(cli_out)
    init = export_weights(root / "model")
    assert a.keys() == b.keys() == init.keys()  # transformers' own checkpoint names (per-expert tensors of the MoE)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # trained
    for out in (train_out, cli_out):
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = sorted(out.glob("model-*-of-*.safetensors"))
        assert len(files) > 1 and set(index["weight_map"].values()) == {f.name for f in files}
        assert all(f.stat().st_size <= parse_size(SHARD, "s") + 4096 or len(load_file(str(f))) == 1 for f in files)
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"][0].startswith(fam.arch.removesuffix("Config"))
        assert GenerationConfig.from_pretrained(str(out)).to_dict() == \
            GenerationConfig.from_pretrained(str(root / "model")).to_dict()
        tok = AutoTokenizer.from_pretrained(str(out))
        assert tok.chat_template == fam.template and len(tok) == len(AutoTokenizer.from_pretrained(str(root / "model")))
        model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        if fam.tied:
            assert "lm_head.weight" not in a and head is emb  # written once, tied again on load
        else:
            assert not torch.equal(head, emb)
        prompt = tok.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**prompt, max_new_tokens=4, do_sample=False)
        assert gen.shape[1] > prompt["input_ids"].shape[1]

