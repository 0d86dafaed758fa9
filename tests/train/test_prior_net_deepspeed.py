"""The MI-DPO prior network on its own DeepSpeed ZeRO-3 engine (one CPU process, gloo, in a subprocess).

- ZeRO-3 prior engine == plain-PyTorch engine (same AdamW, same warmup): per-step metrics and final
  weights within 1e-5 over 5 marginal updates on a fixed policy (the engine's config comes from
  runtime.ds_config.resolve_ds_config through prior_ds_config);
- checkpoint at step 3 (runtime.checkpoint.save_checkpoint), resume in a fresh engine: steps 4-5 equal the
  uninterrupted ones (1e-7);
- export: the live collective export and the offline merge of the step-3 checkpoint reload with
  AutoModelForCausalLM and equal the engine's gathered weights.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import copy, sys, torch
torch.set_num_threads(1)
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from prior_helpers import BETA, PAD, llama, rows, torch_prior, train_step
from transformers import AutoModelForCausalLM
from midpo.runtime import dist as pdist
from midpo.core.batching import collate_pairs
from midpo.config import Config, ModelConfig, PriorNetConfig, TrainConfig
from midpo.runtime.export import gather_engine_state_dict
from midpo.runtime.checkpoint import load_checkpoint, save_checkpoint
from midpo.runtime.export import export_engine
from midpo.stages.export import export_prior
from midpo.train.prior_engine import build_prior_network, prior_ds_config
from midpo.core.prior_net import prior_from_model

pdist.init_distributed()
root = Path(sys.argv[1])
ref = llama(0, scale=8.0)
ref.save_pretrained(root / "ref", safe_serialization=True)
policy = llama(1, scale=8.0).requires_grad_(True)
pn = PriorNetConfig(num_layers=1, lr=1e-2, warmup_steps=2)
cfg = Config(run_dir=str(root / "run"), model=ModelConfig(policy=str(root / "ref"), dtype="fp32", attn_implementation="sdpa"),
             train=TrainConfig(ds_config="zero3_cpu_fp32", micro_batch_size=3, grad_accum=1, max_grad_norm=0.0), prior_net=pn)
ds = prior_ds_config(cfg, 1, 64)
assert ds["zero_optimization"]["stage"] == 3 and ds["optimizer"]["params"]["lr"] == 1e-2, ds

def build():
    return build_prior_network(cfg, init_path=root / "ref", policy_config=ref.config, world_size=1, pad_id=PAD,
                               beta=BETA)

def weights(h):
    return {k: v.double() for k, v in gather_engine_state_dict(h.engine).items()}

batch = collate_pairs(rows(3, seed=21), layout="packed", pad_id=PAD)
a = build()
t = torch_prior(prior_from_model(AutoModelForCausalLM.from_pretrained(root / "ref"), 1), pn, beta=BETA, pad_id=PAD)
ma, mt = [], []
for s in range(1, 6):
    ma.append(train_step(a, policy, batch, s))
    mt.append(train_step(t, policy, batch, s))
    if s == 3:
        save_checkpoint(root / "ckpt", 3, {"prior": a.engine}, {"prior": a.state_dict(), "world_size": 1}, cfg)
        w3 = weights(a)
for x, y in zip(ma, mt):
    assert set(x) == set(y)
    for k in x:
        assert torch.allclose(x[k], y[k], atol=1e-5, rtol=1e-6), (k, x[k], y[k])
assert float(ma[-1]["prior/kl_policy"][0]) < 0.7 * float(ma[0]["prior/kl_policy"][0])  # it learns
wa = weights(a)
wt = {k: v.double() for k, v in t.module.model.state_dict().items()}
for k in wt:
    assert torch.allclose(wa[k], wt[k], atol=1e-5), k

b = build()
b.load_state_dict(load_checkpoint(root / "ckpt" / "step-0000003", {"prior": b.engine})["prior"])
assert b.state_dict() == {"step": 3, "updates": 3}
mb = [train_step(b, policy, batch, s) for s in (4, 5)]
for x, y in zip(ma[3:], mb):
    for k in x:
        assert torch.allclose(x[k], y[k], atol=1e-7, rtol=0), (k, x[k], y[k])
wb = weights(b)
for k in wa:
    assert torch.allclose(wa[k], wb[k], atol=1e-7), k

out = export_engine(a.engine, root / "run" / "export" / "prior", dtype=torch.float32, tokenizer_dir=None,
                    source_dir=None)
assert out == root / "run" / "export" / "prior"
exp3 = export_prior(root / "ckpt" / "step-0000003", root / "exp3", dtype=torch.float32, tokenizer_dir=None)
for folder, want in ((out, wa), (exp3, w3)):
    m = AutoModelForCausalLM.from_pretrained(folder)
    assert m.config.num_hidden_layers == 1
    sd = m.state_dict()
    assert set(sd) <= set(want), set(sd) - set(want)  # want also holds non-persistent buffers (rotary)
    for k in sd:
        assert torch.allclose(sd[k].double(), want[k], atol=1e-6), (folder, k)
print("OK")
"""


def test_prior_engine_zero3_matches_torch_resumes_and_exports(tmp_path):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(REPO / "tests" / "support")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]
