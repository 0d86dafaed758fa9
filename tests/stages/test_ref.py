"""Stage 2 (`midpo ref`) end to end on a tiny Llama, in real subprocesses (1 process, torchrun x2).

Acceptance: 2 processes == 1 process; cached per-token log-probs == an independent single-sequence
forward; SIGKILL of the stage's process group mid-way + re-run == uninterrupted run; a complete
cache is skipped on re-run. Fingerprint refusal lives in tests/runtime/test_cache.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ref_helpers import (
    assert_caches_equal,
    load_cache,
    make_run,
    naive_response_logps,
    run_stage,
    stage_cmd,
    stage_env,
)
from train_helpers import fake_ref_stage, flip_two_bytes, make_rows, write_data

from midpo.runtime.chunks import (
    assign_to_ranks,
    chunk_ranges,
    pair_cost,
    plan_micro_batches,
)
from midpo.runtime.fingerprint import hash_token_ids

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# planning (pure)


def test_chunks_and_micro_batches_respect_budget():
    assert chunk_ranges(13, 5) == [(0, 5), (5, 10), (10, 13)]
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 40, size=(50, 3))
    for packing in (True, False):
        costs = [pair_cost(*map(int, x), packing) for x in lens]
        parts = assign_to_ranks(costs, 3)
        assert sorted(i for p in parts for i in p) == list(range(50))
        loads = [sum(costs[i] for i in p) for p in parts]
        assert max(loads) - min(loads) <= max(costs)  # greedy longest-first balance
        batches = plan_micro_batches(range(50), costs, 100, packing)
        assert sorted(i for b in batches for i in b) == list(range(50))
        for b in batches:
            size = sum(costs[i] for i in b) if packing else len(b) * max(costs[i] for i in b)
            assert size <= 100 or len(b) == 1


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One uninterrupted single-process run (the baseline every other run is compared with)."""
    root = tmp_path_factory.mktemp("ref_base")
    recipe = make_run(root)
    proc = run_stage(recipe, 1)
    return root, recipe, proc


def test_manifest_written_last_and_complete(base):
    root, _, proc = base
    ref = root / "run" / "ref"
    m = json.loads((ref / "manifest.json").read_text())
    data_m = json.loads((root / "run" / "data" / "manifest.json").read_text())
    from midpo.runtime.models import model_fingerprint

    assert m["data_fingerprint"] == data_m["fingerprint"]
    assert m["tokenizer_fingerprint"] == "tok-test-1"
    assert m["reference_fingerprint"] == model_fingerprint(root / "model")
    assert m["dtype"] == "float32" and m["attn_implementation"] == "sdpa" and m["world_size"] == 1
    assert m["splits"]["train"]["rows"] == 19 and m["splits"]["eval"]["rows"] == 5
    assert not (ref / ".work").exists()  # chunks merged and cleaned up
    assert "tok/s" in proc.stderr or "tok/s" in proc.stdout  # progress bar with throughput


def test_cached_equals_naive_forward(base):
    root, _, _ = base
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32, attn_implementation="eager")
    model.eval()
    for split in ("train", "eval"):
        cache = load_cache(root / "run", split)
        from datasets import load_from_disk

        data = load_from_disk(str(root / "run" / "data" / split))
        assert cache["id"] == data["id"]
        for i in (0, 3, len(data) - 1):
            row, c = data[i], cache[i]
            assert c["tokens_hash"] == hash_token_ids(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
            for side in ("chosen", "rejected"):
                want = naive_response_logps(model, row["prompt_ids"], row[f"{side}_ids"])
                got = np.asarray(c[f"{side}_ref_logps"])
                assert got.shape == want.shape
                np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
                assert c[f"{side}_ref_logp_sum"] == pytest.approx(float(want.astype(np.float64).sum()), abs=1e-4)
                assert want.min() < -1.0  # not a degenerate model


def test_two_processes_equal_one_process(base, tmp_path):
    root, _, _ = base
    recipe2 = make_run(tmp_path)  # same seeds -> same model and data
    run_stage(recipe2, 2)
    assert json.loads((tmp_path / "run" / "ref" / "manifest.json").read_text())["world_size"] == 2
    for split in ("train", "eval"):
        assert_caches_equal(load_cache(root / "run", split), load_cache(tmp_path / "run", split), atol=1e-5)


def test_sigkill_process_group_then_resume_is_identical(base, tmp_path):
    root, _, _ = base
    recipe = make_run(tmp_path)
    work = tmp_path / "run" / "ref" / ".work" / "train"
    proc = subprocess.Popen(stage_cmd(recipe, 1, faults=("--pause-after-chunks", "1")), env=stage_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(work.glob("chunk-*.arrow")):
            assert proc.poll() is None, "stage exited before it was killed"
            time.sleep(0.2)
        assert list(work.glob("chunk-*.arrow")), "no chunk written in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, no chance to clean up
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "ref" / "manifest.json").exists()
    assert [p.name for p in work.glob("chunk-*.arrow")] == ["chunk-00000-of-00004.arrow"]
    resumed = run_stage(recipe, 1)
    assert "resuming, 1/4 chunks already done" in resumed.stdout
    for split in ("train", "eval"):
        assert_caches_equal(load_cache(root / "run", split), load_cache(tmp_path / "run", split), atol=0.0)
    again = run_stage(recipe, 1)  # complete + same plan: skipped
    assert "nothing to do" in again.stdout


def test_zero3_two_processes_via_midpo_cli(base, tmp_path):
    """`midpo ref --nproc 2 ref.zero3=true`: the CLI spawns torchrun, the reference is sharded with a
    ZeRO-3 engine (all-gathers in every forward, uneven last chunk padded with dummy forwards)."""
    root, _, _ = base
    recipe = make_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "midpo.cli", "ref", "--config", str(recipe), "--nproc", "2",
                           "ref.zero3=true"], env=stage_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    m = json.loads((tmp_path / "run" / "ref" / "manifest.json").read_text())
    assert m["zero3"] is True and m["world_size"] == 2
    for split in ("train", "eval"):
        assert_caches_equal(load_cache(root / "run", split), load_cache(tmp_path / "run", split), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# "up to date" checks and --force (in this process: the stage's engine with stand-in scores)


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def test_up_to_date_check_verifies_the_cache_and_rebuilds_it(tmp_path):
    """A complete cache is skipped only while its files match the manifest: an edited row count, a
    damaged shard or --force rebuild it (the manifest is rewritten)."""
    data_dir = write_data(tmp_path / "data", {"train": make_rows(9, 1), "eval": make_rows(3, 2)})
    ref = tmp_path / "ref"
    assert fake_ref_stage(ref, data_dir) is not None
    assert fake_ref_stage(ref, data_dir) is None  # up to date: nothing to do
    manifest = ref / "manifest.json"
    m = json.loads(manifest.read_text())
    m["splits"]["eval"]["rows"] = 4  # hand-edited
    manifest.write_text(json.dumps(m))
    stamp = _mtime(manifest)
    assert fake_ref_stage(ref, data_dir) is not None and _mtime(manifest) != stamp
    assert json.loads(manifest.read_text())["splits"]["eval"]["rows"] == 3
    stamp = _mtime(manifest)
    flip_two_bytes(next((ref / "train").glob("data-*.arrow")))
    assert fake_ref_stage(ref, data_dir) is not None and _mtime(manifest) != stamp
    assert fake_ref_stage(ref, data_dir) is None
    stamp = _mtime(manifest)
    assert fake_ref_stage(ref, data_dir, force=True) is not None and _mtime(manifest) != stamp


@pytest.mark.parametrize("damage", ["corrupt", "delete", "rows"])
def test_damaged_data_is_refused_not_nothing_to_do(tmp_path, damage):
    """`midpo ref` with a complete cache and damaged input data refuses naming the file (it cannot rebuild
    its input), instead of "nothing to do"; with ref/ deleted it does not rebuild the cache on the damage."""
    from midpo.runtime.prepared import DataDamaged

    data_dir = write_data(tmp_path / "data", {"train": make_rows(9, 1), "eval": make_rows(3, 2)})
    ref = tmp_path / "ref"
    fake_ref_stage(ref, data_dir)
    shard = data_dir / "train" / "data-00001-of-00002.arrow"
    if damage == "corrupt":
        flip_two_bytes(shard)
        want = f"{shard}: content hash differs from {data_dir / 'manifest.json'} (damaged or edited)"
    elif damage == "delete":
        shard.unlink()
        want = f"{shard}: missing (recorded in {data_dir / 'manifest.json'})"
    else:
        m = json.loads((data_dir / "manifest.json").read_text())
        m["splits"]["train"]["rows"] = 10
        (data_dir / "manifest.json").write_text(json.dumps(m))
        want = f"{data_dir / 'manifest.json'}: says 10 rows for train/ but its files hold 9 (damaged or edited)"
    want += "; re-run `midpo prep --force`"
    for _ in ("complete cache", "ref/ deleted"):
        with pytest.raises(DataDamaged) as e:
            fake_ref_stage(ref, data_dir)
        assert str(e.value) == want
        shutil.rmtree(ref)
        ref.mkdir()


def test_force_flag_reaches_ref_and_weights(tmp_path, monkeypatch):
    """`midpo ref|weights --force` (one process, or spawning torchrun) reaches the stage as force=True."""
    from midpo import cli
    from midpo.stages import ref as reference
    from midpo.stages import weights as token_weights

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_dir: {tmp_path / 'run'}\n")
    for var in ("RANK", "SLURM_PROCID"):  # an in-process group of another test may have set RANK
        monkeypatch.delenv(var, raising=False)
    calls = []
    for mod in (reference, token_weights):
        monkeypatch.setattr(mod, "main", lambda cfg, splits, force=False, m=mod.__name__: calls.append((m, force)))
    from midpo.runtime import launch

    monkeypatch.setattr(launch, "launch_torchrun", lambda module, argv, nproc: calls.append((module, argv)) or 0)
    for stage in ("ref", "weights"):
        assert cli.main([stage, "--config", str(recipe)]) == 0
        assert cli.main([stage, "--config", str(recipe), "--force"]) == 0
        assert cli.main([stage, "--config", str(recipe), "--force", "--nproc", "2"]) == 0
    mods = ("midpo.stages.ref", "midpo.stages.weights")
    assert calls == [c for m in mods for c in ((m, False), (m, True), (m, [f"--config={recipe}", "--force"]))]
