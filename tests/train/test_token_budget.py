"""Token-budget micro-batches (train.micro_batch_tokens), in one CPU process (DeepSpeed in a subprocess):
the gradient of one optimizer step over token-budget micro-batches of varying pair counts equals the fixed-count
micro-batches' gradient over the same global batch (1e-6 relative), and so does the logged loss; the engine then
steps at the hand-set boundary and the next fixed-count step still works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from prior_helpers import PAD, llama, rows
from midpo.config import load_config
from midpo.core.batching import collate_pairs
from midpo.core.budget import fill_to_budget
from midpo.core.logprobs import ResponseLogps
from midpo.core.priors import build_prior
from midpo.core.schedule import make_scheduler
from midpo.runtime import dist as pdist
from midpo.runtime.ds_config import resolve_ds_config
from midpo.runtime.engine import Engine, PolicyLogps, policy_logps
from midpo.train.step import MicroBatch, Objective, train_step

pdist.init_distributed()
cfg = load_config(None, ["model.dtype=fp32", "train.ds_config=zero0_cpu_fp32", "train.micro_batch_size=2",
                         "train.grad_accum=3", "train.lr=1e-3", "train.max_grad_norm=0", "loss.beta=0.1",
                         "loss.sft_weight=0.5"])
obj = Objective(build_prior(cfg.loss), cfg.loss)
data = rows(6, seed=4)
ref_model = llama(9)

def mb(rs):
    b = collate_pairs(rs, layout="padded", pad_id=PAD)
    with torch.no_grad():
        from midpo.core.logprobs import response_logps
        r = response_logps(ref_model, b)
    return MicroBatch(b, ResponseLogps(r.chosen, r.chosen_mask, r.rejected, r.rejected_mask), None, None, [])

grads = {}
orig = Engine.step
def capture(self):
    grads[id(self)] = torch.cat([p.grad.reshape(-1) for p in self.ds.module.parameters()]).clone()
    return orig(self)
Engine.step = capture

def engine():
    ds = resolve_ds_config(cfg, world_size=1, hidden_size=64)
    return Engine.build(PolicyLogps(llama(1)), ds, lr_scheduler=lambda o: make_scheduler(o, 10, 0.0, "constant"))

fixed = engine()
r_fixed = train_step(fixed, obj, [mb(data[i:i + 2]) for i in range(0, 6, 2)], 1)
lens = [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in data]
groups = fill_to_budget(lens, 40, "padded")
sizes = [len(g) for g in groups]
assert len(set(sizes)) > 1 and len(groups) != 3, sizes  # varying pair counts, another number of micro-steps
budget = engine()
r_budget = train_step(budget, obj, [mb([data[i] for i in g]) for g in groups], 1, global_pairs=6)
a, b = grads[id(fixed)], grads[id(budget)]
rel = float((a - b).norm() / a.norm())
assert rel < 1e-6, rel
for name in ("loss", "loss/sft", "rewards/margins"):
    (s1, c1), (s2, c2) = r_fixed.sums[name], r_budget.sums[name]
    assert c1 == c2 == 6 and abs(s1 / c1 - s2 / c2) < 1e-6, (name, s1 / c1, s2 / c2)
# the weights moved the same way; the next step of a budget engine with another count also steps
wa = torch.cat([p.reshape(-1) for p in fixed.ds.module.parameters()])
wb = torch.cat([p.reshape(-1) for p in budget.ds.module.parameters()])
assert float((wa - wb).abs().max()) < 1e-6
before = wb.clone()
train_step(budget, obj, [mb(data[:1]), mb(data[1:6])], 2, global_pairs=6)
assert not torch.equal(before, torch.cat([p.reshape(-1) for p in budget.ds.module.parameters()]))
print("OK", sizes, rel)
"""


def test_budget_gradient_equals_fixed_count():
    env = {"PYTHONPATH": f"{REPO}:{REPO / 'tests' / 'support'}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO / "tests" / "support")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
