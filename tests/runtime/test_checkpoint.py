"""Checkpoint helpers without DeepSpeed: RNG state round trip (weights_only load), `latest` handling."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from midpo.runtime.checkpoint import _prune, latest_checkpoint, rng_state, set_rng_state, step_dir_name


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "latest").write_text("step-0000005\n")
    with pytest.raises(RuntimeError, match="trainer_state.json is missing"):
        latest_checkpoint(tmp_path)
    (tmp_path / "step-0000005").mkdir()
    (tmp_path / "step-0000005" / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-0000005"


def test_prune_keeps_the_last_k(tmp_path):
    for s in (1, 2, 3, 10):
        (tmp_path / step_dir_name(s)).mkdir()
    _prune(tmp_path, 2, keep=step_dir_name(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000003", "step-0000010"]


# ---------------------------------------------------------------------------------------------
# safe loading (issue #14: a checkpoint folder must not be able to run code)


def test_safe_loading_refuses_a_pickle_that_runs_code(tmp_path):
    """The crafted file runs code under a plain `torch.load(weights_only=False)` (the call DeepSpeed's loaders
    make); safe_load refuses it, and inside safe_torch_load() that very DeepSpeed-style call is refused too."""
    from train_helpers import write_code_running_pickle

    from midpo.runtime.checkpoint import UnsafeCheckpointError, safe_load, safe_torch_load, unsafe_files

    marker = tmp_path / "MARKER"
    (tmp_path / "ckpt").mkdir()
    bad = write_code_running_pickle(tmp_path / "ckpt" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    torch.save({"module": {"w": torch.ones(2)}}, tmp_path / "ckpt" / "ok.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"optim_states.pt: refused to load.*could run code"):
        safe_load(bad)
    original = torch.load
    with pytest.raises(UnsafeCheckpointError), safe_torch_load(), safe_torch_load():  # nested, left by the error
        torch.load(bad, map_location="cpu", weights_only=False)  # e.g. TorchCheckpointEngine.load
    assert torch.load is original  # the routing ends with the scope
    assert not marker.exists()
    found = unsafe_files(tmp_path / "ckpt")
    assert len(found) == 1 and found[0].startswith(str(bad)) and "pathlib" in found[0]
    assert torch.equal(safe_load(tmp_path / "ckpt" / "ok.pt")["module"]["w"], torch.ones(2))
    torch.load(bad, weights_only=False)  # the control: the file really runs code when trusted
    assert marker.exists()


def test_deepspeed_optimizer_state_types_load_safely(tmp_path):
    """The allow-list holds the types DeepSpeed pickles into optim_states (ZeroStageEnum, loss scalers, ZeRO-2's
    fragment_address): a file with them loads under safe_load; torch's own weights_only default refuses it."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from midpo.runtime.checkpoint import safe_load, unsafe_files

    sd = {"optimizer_state_dict": {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0),
                                   "dyn": DynamicLossScaler(2.0 ** 16, 1000, 1.0, 2, False),
                                   "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}]}}
    torch.save(sd, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=True)
    got = safe_load(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    assert got["zero_stage"] == 3 and got["loss_scaler"].cur_scale == 1.0 and got["dyn"].scale_window == 1000
    assert got["param_slice_mappings"][0]["w"].numel == 4
    assert unsafe_files(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# resume compatibility and --force


def _cfg(*overrides: str):
    from midpo.config import load_config

    return load_config(None, ["run_dir=/r", "train.micro_batch_size=2", "train.grad_accum=1", *overrides])


def test_resume_differences_name_every_changed_key():
    from midpo.train.resume import resume_differences

    saved, state = _cfg(), {"world_size": 2, "step": 3, "total_steps": 6, "inputs": {"data": "d1", "reference": "r1"}}
    refused, accepted = resume_differences(saved, state, _cfg("loss.prior=simpo", "train.lr=1e-3",
                                                              "loss.options.c=2", "train.save_every=5"),
                                           2, {"data": "d1", "reference": "r1"}, 6)
    assert refused == ["loss.options.c: None -> 2", "loss.prior: 'dpo' -> 'simpo'", "train.lr: 5e-07 -> 0.001"]
    assert accepted == ["train.save_every: 0 -> 5 (when to checkpoint)"]
    # another process count: accepted with the same global batch (2 x 1 x 2 = 1 x 4 x 1 = 4), refused otherwise
    refused, accepted = resume_differences(saved, state, _cfg("train.micro_batch_size=1", "train.grad_accum=4"), 1,
                                           {}, 6)
    assert refused == [] and any(a.startswith("processes: 2 -> 1") for a in accepted)
    refused, _ = resume_differences(saved, state, _cfg(), 1, {}, 6)
    assert len(refused) == 1 and "= 4 at the checkpoint" in refused[0] and "pass train.grad_accum=2" in refused[0]
    # changed inputs, and a longer run (the lr schedule re-laid: said, with the lr jump)
    refused, accepted = resume_differences(saved, state, _cfg("train.max_steps=12"), 2, {"data": "d2"}, 12)
    assert refused == ["data fingerprint: d1 -> d2 (the data changed since the checkpoint)"]
    assert any(a.startswith("run length: 6 -> 12 steps") and "lr of step 4" in a for a in accepted)


def test_resume_with_auto_compares_the_resolved_values():
    """The checkpoint records what `auto` chose; a resume whose auto resolves the same passes, another choice is
    refused naming why it was chosen now and the override that keeps the checkpoint's."""
    from midpo.train.resume import resume_differences

    state = {"world_size": 1, "step": 3, "total_steps": 6}
    saved = _cfg("train.ds_config=zero0_cpu_fp32", "train.layout=shared")
    same = _cfg("train.ds_config=zero0_cpu_fp32", "train.layout=shared")
    picks = {"train.ds_config": {"value": "zero0_cpu_fp32", "reason": "stage 0: fits"}}
    assert resume_differences(saved, state, same, 1, {}, 6, picks) == ([], [])
    now = _cfg("train.ds_config=zero3_cpu_fp32", "train.layout=shared")
    picks = {"train.ds_config": {"value": "zero3_cpu_fp32", "reason": "ZeRO-3: predicted 3 GiB fits"}}
    refused, _ = resume_differences(saved, state, now, 1, {}, 6, picks)
    assert refused == ["train.ds_config: 'zero0_cpu_fp32' -> 'zero3_cpu_fp32' (train.ds_config=auto chose "
                       "'zero3_cpu_fp32' for this launch: ZeRO-3: predicted 3 GiB fits; pass "
                       "train.ds_config=zero0_cpu_fp32 to resume with the checkpoint's)"]
    # a checkpoint from before train.layout: its boolean spelled the same layout, nothing to refuse; another is
    old = _cfg("train.packing=false")
    refused, accepted = resume_differences(old, state, _cfg("train.layout=padded"), 1, {}, 6)
    assert refused == [] and accepted[0].startswith("train.packing: False -> None")
    refused, _ = resume_differences(old, state, _cfg("train.share_prompt=true"), 1, {}, 6)
    assert refused == ["train.layout: 'padded' -> 'shared'"]


def test_start_over_removes_only_what_training_wrote(tmp_path):
    from midpo.runtime.files import OutputDirError, mark_output
    from midpo.train.resume import start_over

    run = tmp_path / "run"
    ck = run / "checkpoints"
    for d in (ck / "step-0000003", ck / "step-0000006", run / "logs", run / "tensorboard", run / "export",
              run / "data"):
        d.mkdir(parents=True)
    (ck / "latest").write_text("step-0000006\n")
    (ck / "notes.txt").write_text("mine")
    (ck / "zero_to_fp32.py").write_text("DeepSpeed writes it beside its checkpoints")
    for f in ("train_metrics.jsonl", "consumed_rows.jsonl", "profile_rank0.txt", "other.log"):
        (run / "logs" / f).write_text("x")
    (run / "tensorboard" / "events.out.tfevents.1.host").write_text("x")
    (run / "export" / "model.safetensors").write_text("x")
    (run / "config.yaml").write_text("x")
    with pytest.raises(OutputDirError, match="not written by midpo"):  # a foreign export/: nothing removed at all
        start_over(run)
    assert (ck / "latest").exists() and (run / "logs" / "train_metrics.jsonl").exists()
    mark_output(run / "export", "export")
    start_over(run)
    assert sorted(p.name for p in ck.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["other.log"]
    assert not (run / "tensorboard").exists() and not (run / "export").exists()
    assert (run / "data").is_dir() and (run / "config.yaml").exists()


def test_update_saved_config_rewrites_only_changed_values(tmp_path):
    from midpo.runtime.files import save_config, update_saved_config

    path = save_config(_cfg(), tmp_path / "config.yaml")
    path.write_text(path.read_text())  # same text, new mtime: then the call must leave it alone
    before = path.stat().st_mtime_ns
    assert update_saved_config(_cfg(), path) == [] and path.stat().st_mtime_ns == before
    assert update_saved_config(_cfg("loss.prior=simpo"), path) == [("loss.prior", "dpo", "simpo")]
    assert "simpo" in path.read_text()


def test_auto_resolved_is_noted_other_changes_warn(tmp_path, caplog):
    """`auto` becoming its choice is what every default run does: an info line, not a warning; a real change warns."""
    import logging

    from midpo.runtime.files import save_config, update_saved_config

    path = save_config(_cfg("train.ds_config=auto"), tmp_path / "config.yaml")
    with caplog.at_level(logging.INFO, logger="midpo.runtime.files"):
        assert update_saved_config(_cfg("train.ds_config=zero0_cpu_fp32"), path) == [
            ("train.ds_config", "auto", "zero0_cpu_fp32")]
        assert [r.levelno for r in caplog.records] == [logging.INFO]
        caplog.clear()
        update_saved_config(_cfg("train.ds_config=zero3_cpu_fp32"), path)
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
