"""LoRA through PEFT (`model.lora`) and the metric sinks (`train.report_to`), on the tiny Llama of train_helpers.

Runs (5 steps, global batch 4, LoRA r=4 alpha=8 on every linear layer, the norms trained in full as
modules_to_save):
- `one`: 1 process (in this one), ZeRO-3, accum 2, checkpoints at 3 and 5, report_to tensorboard + jsonl + wandb
  (offline) + mlflow (file store), export.merge_lora=true;
- `two`: 2 processes (subprocesses), ZeRO-3, accum 1, SIGKILLed after step 4 (checkpoint 3) and relaunched: the
  resumed step 4 equals the killed attempt's (1e-6, same world size), and all 5 losses and the adapters equal
  `one`'s (1e-5: the reduction order);
- in-process: ZeRO-2 with the shared-prompt layout and ZeRO-0 with the padded layout equal `one` (1e-5);
  the export of the ZeRO-0 checkpoint (its whole-model file) equals its end-of-training export.
Checked on them: the optimizer state (checkpoint files) holds exactly the adapter parameters of an independently
built PEFT model and no checkpoint holds a base weight; the adapter folder loads with PeftModel.from_pretrained
and gives the merged folder's log-probs (1e-5); merged weights == base + alpha/r * B @ A computed here (1e-6) and
the merged model generates what the PEFT model generates; `midpo export` from the checkpoint writes the same
folders. The online reference of a LoRA policy (its base with adapters disabled) equals a separately loaded
frozen reference (log-probs, logits, hidden states: 1e-6); tdpo (online) and the learned prior train with LoRA.
The W&B offline run (read by `wandb leet inspect --json`) and the MLflow file store (MlflowClient) hold TRL's
metric names (train/loss, train/rewards/accuracies, eval/...) with the values of logs/train_metrics.jsonl, and
the resolved config as parameters.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import (  # noqa: F401
    REPO,
    clean_env,
    export_weights,
    fresh_copy,
    launcher_env_dropped,
    losses,
    make_model,
    make_rows,
    make_run,
    process_group,
    read_jsonl,
    recipe_text,
    run_midpo,
    run_then_kill_after_step,
    run_train,
    train_cmd,
)

pytestmark = pytest.mark.distributed

R, ALPHA = 4, 8.0
LORA_YAML = f"  lora:\n    r: {R}\n    alpha: {ALPHA}\n    modules_to_save: [norm]\n"
TRAIN = {"max_steps": 5, "save_every": 3, "eval_every": 0, "keep_last": 2}
TRL_TRAIN = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "lr", "grad_norm")


def lora_recipe(run: Path, model: Path, *, trackers: str = "[tensorboard]", **train) -> str:
    text = recipe_text(run, model, **{**TRAIN, **train}).replace("model:\n", "model:\n" + LORA_YAML, 1)
    return text + f"  report_to: {trackers}\nexport:\n  merge_lora: true\n"


def _copy_run(lora: dict, name: str, **train) -> tuple[Path, Path]:
    return fresh_copy(lora["one"], lora["root"] / name, lambda run: lora_recipe(run, lora["model"], **train))


def _train_here(recipe: Path, *overrides: str) -> None:
    """Training in this process (one gloo process: the session's process_group)."""
    from midpo.config import load_config
    from midpo.stages.train import main

    main(load_config(recipe, list(overrides)))


@pytest.fixture(scope="module")
def lora(tmp_path_factory, process_group, launcher_env_dropped) -> dict:  # noqa: F811
    root = tmp_path_factory.mktemp("lora")
    make_run(root / "one", n_train=16, n_eval=4, **TRAIN)
    out = {"root": root, "one": root / "one" / "run", "model": root / "one" / "model"}
    recipe = root / "one" / "recipe.yaml"
    recipe.write_text(lora_recipe(out["one"], out["model"], trackers="[tensorboard, jsonl, wandb, mlflow]"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        _train_here(recipe)
    # 2 processes, accum 1, SIGKILLed after step 4 (checkpoint at 3), then relaunched
    recipe2, run2 = _copy_run(out, "two", grad_accum=1)
    run_then_kill_after_step(train_cmd(recipe2, 2, faults=("--pause-after-step", "4")), clean_env(), run2, 4,
                             logged=True)
    out["killed"] = losses(run2)  # steps 1-4 of the attempt that died
    out["latest_after_kill"] = (run2 / "checkpoints" / "latest").read_text().strip()
    out["export_after_kill"] = (run2 / "export").exists()
    run_train(recipe2, 2)
    return {**out, "recipe": recipe, "two": run2}


def _adapters(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _assert_same_adapters(a: Path, b: Path, atol: float) -> None:
    x, y = _adapters(a), _adapters(b)
    assert x.keys() == y.keys() and x
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=atol, rtol=0)


def test_two_processes_match_one_resume_matches_uninterrupted(lora):
    l1, l2 = losses(lora["one"]), losses(lora["two"])
    assert len(l1) == len(l2) == 5
    assert l1[0] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the policy starts as the reference
    assert np.ptp(l1) > 1e-3, "the losses must move, or the comparison proves nothing"
    np.testing.assert_allclose(l2, l1, atol=1e-5, rtol=0)  # 2 processes (killed, resumed) == 1 process
    # the resumed step 4 == the killed attempt's step 4 (same world size, same reduction order)
    assert lora["latest_after_kill"] == "step-0000003" and not lora["export_after_kill"]
    assert len(lora["killed"]) == 4
    np.testing.assert_allclose(l2[:4], lora["killed"], atol=1e-6, rtol=0)
    _assert_same_adapters(lora["two"] / "export", lora["one"] / "export", atol=1e-5)
    assert [r["ids"] for r in read_jsonl(lora["two"] / "logs" / "consumed_rows.jsonl")] == \
        [r["ids"] for r in read_jsonl(lora["one"] / "logs" / "consumed_rows.jsonl")]


def test_optimizer_and_checkpoints_hold_only_the_adapters(lora):
    """What trains, built here with PEFT alone: every ZeRO-3 checkpoint holds exactly these parameters, in the
    optimizer (fp32 partitions, Adam moments) and in the model file; base weights only as ZeRO-3's empty
    placeholders of the tied output head (DeepSpeed names a tied weight once when it drops frozen ones)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(lora["model"])),
                           LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", modules_to_save=["norm"]))
    trainable = {"model." + n[len("base_model.model."):]: p.numel() for n, p in model.named_parameters()
                 if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("norm" in n for n in trainable)
    total = sum(trainable.values())
    for run, ranks in ((lora["one"], 1), (lora["two"], 2)):
        ckpt = run / "checkpoints" / "step-0000005"
        states = torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
        assert {k: v.numel() for g in states["param_shapes"] for k, v in g.items()} == trainable
        assert all(k in trainable or v.numel() == 0 for k, v in states["module"].items())
        flat = moments = 0
        for r in range(ranks):
            opt = torch.load(ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)
            flat += sum(t.numel() for t in opt["optimizer_state_dict"]["fp32_flat_groups"])
            moments += sum(s["exp_avg"].numel() for s in opt["optimizer_state_dict"]["optimizer_state_dict"]["state"].values())
        assert total <= flat < total + 64 * ranks and moments == flat  # ZeRO pads each partition a little
        assert sum(f.stat().st_size for f in ckpt.glob("*.pt")) < 40 * total  # adapters, Adam moments, RNG


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits.double(), -1)


def test_export_adapter_folder_and_merged_model(lora):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    export = lora["one"] / "export"
    cfg = json.loads((export / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"]) == (R, ALPHA, "LORA")
    base = load_file(str(lora["model"] / "model.safetensors"))
    merged = export_weights(export / "merged")
    adapters = _adapters(export)
    assert merged.keys() == base.keys()
    seen = set()
    for k, a in adapters.items():  # PEFT's names: base_model.model.<module>.lora_A.weight, or <module>.weight (norms)
        name = k[len("base_model.model."):]
        if ".lora_A." in name:
            w = name.replace(".lora_A.weight", ".weight")
            b = adapters[k.replace("lora_A", "lora_B")]
            expect = base[w].double() + (ALPHA / R) * (b.double() @ a.double())
            torch.testing.assert_close(merged[w].double(), expect, atol=1e-6, rtol=0)
            seen.add(w)
        elif ".lora_B." not in name:  # a modules_to_save copy: merged as trained
            torch.testing.assert_close(merged[name], a, atol=0, rtol=0)
            seen.add(name)
    assert any("q_proj" in w for w in seen) and any("norm" in w for w in seen)
    for k in base.keys() - seen:  # what LoRA does not touch stays the base's
        torch.testing.assert_close(merged[k], base[k], atol=0, rtol=0)
    assert max(float((merged[w] - base[w]).abs().max()) for w in seen) > 1e-4  # it trained

    ids = torch.tensor([r["prompt_ids"] + r["chosen_ids"] for r in make_rows(3, 7, max_len=8)][0])[None]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(lora["model"])), str(export)).eval()
    merged_model = AutoModelForCausalLM.from_pretrained(str(export / "merged")).eval()
    torch.testing.assert_close(_logits(peft_model, ids), _logits(merged_model, ids), atol=1e-5, rtol=0)
    gen = merged_model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert gen.shape[1] == ids.shape[1] + 6
    assert torch.equal(gen, peft_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, min_new_tokens=6))

    # `midpo export` (offline, one process) from the final ZeRO-3 checkpoint writes the same two folders
    out = lora["root"] / "export_cli"
    proc = run_midpo("export", "--config", str(lora["recipe"]), "--out", str(out), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_adapters(out, export, atol=0)
    cli = export_weights(out / "merged")
    for k in merged:
        torch.testing.assert_close(cli[k], merged[k], atol=0, rtol=0)


def _wandb_records(run_dir: Path) -> list[dict]:
    [wandb_file] = list((run_dir / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    wandb_cli = Path(sys.executable).with_name("wandb")
    proc = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(wandb_file)], capture_output=True,
                          text=True, timeout=120, env=clean_env(WANDB_MODE="offline"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]


def test_wandb_offline_and_mlflow_file_store_hold_trl_metrics(lora):
    from mlflow import MlflowClient

    run = lora["one"]
    jsonl = read_jsonl(run / "logs" / "train_metrics.jsonl")
    expect = {f"train/{k}": [r[k] for r in jsonl] for k in TRL_TRAIN}
    steps = [r["step"] for r in jsonl]
    assert steps == [1, 2, 3, 4, 5]

    records = _wandb_records(run)
    history: dict[str, dict[int, float]] = {}
    for r in records:
        if r.get("type") == "history":
            item = r["history"]["item"]
            for k, v in item.items():
                if not k.startswith("_"):
                    history.setdefault(k, {})[int(item["_step"])] = v
    for k, vals in expect.items():
        assert [history[k][s] for s in steps] == pytest.approx(vals, rel=1e-6, abs=1e-9), k
    assert 5 in history["eval/loss"] and "eval/rewards/accuracies" in history
    [run_rec] = [r["run"] for r in records if r.get("type") == "run"]
    assert run_rec["config"]["update"]["model.lora.r"] == R and run_rec["config"]["update"]["loss.prior"] == "dpo"

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    run_id = (run / "logs" / "mlflow_run_id").read_text().strip()
    for k, vals in expect.items():
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
        assert [s for s, _ in hist] == steps and [v for _, v in hist] == pytest.approx(vals, rel=1e-6, abs=1e-9), k
    mrun = client.get_run(run_id)
    assert mrun.info.status == "FINISHED" and "eval/loss" in mrun.data.metrics
    assert mrun.data.params["model.lora.r"] == str(R) and mrun.data.params["train.max_steps"] == "5"

    # jsonl sink and TensorBoard: the same names
    sink = read_jsonl(run / "logs" / "metrics.jsonl")
    assert [r["train/loss"] for r in sink if "train/loss" in r] == pytest.approx(expect["train/loss"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert set(expect) <= set(acc.Tags()["scalars"])


# ---------------------------------------------------------------------------------------------
# in-process (one gloo process): ZeRO-2 / ZeRO-0 and the other layouts, the online reference, other priors


@pytest.mark.usefixtures("process_group")
def test_zero2_shared_prompt_and_zero0_padded_equal_zero3(lora):
    from midpo.config import load_config
    from midpo.stages.export import export_checkpoint

    for name, ds, layout in (("z2", "zero2_cpu_fp32", "share_prompt=true"), ("z0", "zero0_cpu_fp32", "packing=false")):
        recipe, run = _copy_run(lora, name, ds_config=ds, **dict([layout.split("=")]))
        _train_here(recipe)
        np.testing.assert_allclose(losses(run), losses(lora["one"]), atol=1e-5, rtol=0)
        _assert_same_adapters(run / "export", lora["one"] / "export", atol=1e-5)
    # ZeRO-0's checkpoint is one whole-model file: only the adapters in it, and `midpo export` reads them
    ckpt = run / "checkpoints" / "step-0000005"
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert {k for k in states if "lora_" not in k and "modules_to_save" not in k} == {"model.lm_head.weight"}  # tied
    export_checkpoint(ckpt, load_config(recipe), run / "export_cli")
    _assert_same_adapters(run / "export_cli", run / "export", atol=0)


@pytest.mark.usefixtures("process_group")
def test_online_reference_is_the_base_with_adapters_disabled(lora):
    """The reference of a LoRA policy with an online reference: the policy's own ZeRO-3 engine with adapters off,
    equal to the base loaded separately on its own frozen engine (per-token log-probs, full-vocab logits, hidden
    states), while the policy (random B: adapters active) differs; the adapters still train afterwards."""
    from midpo.config import LoraSettings, load_config
    from midpo.core.batching import collate_pairs
    from midpo.runtime.ds_config import resolve_ds_config
    from midpo.runtime.engine import AdapterReference, Engine, PolicyLogps, build_reference_engine, policy_logps
    from midpo.runtime.lora import apply_lora
    from midpo.runtime.models import load_model

    cfg = load_config(lora["recipe"], ["model.lora.init_weights=false"])
    ds = resolve_ds_config(cfg, 1, 64)
    model = load_model(lora["model"], cfg.model, train=True)
    peft_model = apply_lora(model, LoraSettings(r=R, alpha=ALPHA, init_weights=False))
    policy = Engine.build(PolicyLogps(model, peft_model=peft_model), ds)
    batch = collate_pairs(make_rows(4, 9), layout="packed", pad_id=0, max_row_tokens=512)
    ours = AdapterReference(policy.ds, return_logits=True, return_hidden=True)(batch)
    frozen = build_reference_engine(load_model(lora["model"], cfg.model), ds, return_logits=True,
                                    return_hidden=True)(batch)
    for field in ("chosen", "rejected", "chosen_logits", "rejected_logits", "chosen_hidden", "rejected_hidden"):
        a, b = getattr(ours, field), getattr(frozen, field)
        assert a is not None and a.shape == b.shape, field
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    pol = policy_logps(policy, batch)
    assert float((pol.chosen - frozen.chosen).abs().max()) > 1e-3  # the adapters are on again
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.usefixtures("process_group")
@pytest.mark.parametrize("overrides", [("loss.prior=tdpo", "train.online_reference=true"),
                                       ("loss.prior=learned", "prior_net.num_layers=1", "prior_net.lr=1e-3")])
def test_lora_trains_with_online_tdpo_and_the_learned_prior(lora, overrides):
    name = overrides[0].split("=")[1]
    recipe, run = _copy_run(lora, name, max_steps=3, save_every=0)
    _train_here(recipe, *overrides, "export.merge_lora=false")
    got = losses(run)
    assert len(got) == 3 and np.isfinite(got).all() and np.ptp(got) > 1e-4
    if name == "tdpo":  # policy == reference at step 1: every KL and log-ratio is 0
        assert got[0] == pytest.approx(math.log(2), abs=1e-6)
    assert (run / "export" / "adapter_config.json").is_file()
    if name == "learned":
        assert (run / "export" / "prior" / "config.json").is_file()  # the prior network: full, its own engine


def test_lora_and_report_to_settings_are_checked():
    from midpo.config import ConfigError, load_config

    cfg = load_config(None, ["model.lora.r=8", "model.lora.init_weights=gaussian", "model.lora.target_modules=[q_proj]",
                             "train.report_to=[jsonl, mlflow]"])
    assert (cfg.model.lora.enabled, cfg.model.lora.init_weights, cfg.model.lora.target_modules) == \
        (True, "gaussian", ["q_proj"])
    for bad, words in ((["model.lora.init_weights=pissa"], "base-rewriting"),
                       (["model.lora.r=3", "model.lora.init_weights=orthogonal"], "even rank"),
                       (["model.lora.r=-1"], "model.lora.r"), (["train.report_to=[neptune]"], "neptune")):
        with pytest.raises(ConfigError, match=words):
            load_config(None, bad)
