"""Sequence parallelism (train.sequence_parallel, runtime.seqpar): activation memory per rank at k=2 vs k=1, and
the longest pair that trains under a fixed activation cap, in one invocation (a bench: prints numbers, asserts
nothing).

    PYTHONPATH=. python bench/sp_bench.py [--seq 4096] [--cap-mib 0]

One torchrun launch of 2 CPU processes (gloo, one thread each, docs/plan.md's measured-child environment). The
model: a small Llama (hidden 128, 2 layers, 4 heads / 2 key-value heads, vocab 2048, fp32, sdpa), built from a
seed on each rank. A pair has prompt = chosen = rejected = S/2 tokens, so its two sequences are S tokens each:
with the CPU packed layout (rows of at most 512 tokens, a longer sequence its own row) that is two rows of S.
One training micro-step is midpo's forward (core.logprobs.response_logps; at k=2 through the all-to-all attention
wrapper, each rank holding half the columns; at k=1 the same dense-input path as a group of one, so both run
without a T x T mask for these one-sequence rows) then backward of a DPO-shaped loss, the output head in
ceil(response positions / 1024) checkpointed calls as runtime.engine.PolicyLogps makes them.

Measured per rank: the bytes autograd holds for backward at the end of the forward (torch's saved-tensor hooks,
unique storages, parameters excluded): the activation memory the forward leaves for backward, the largest over
the group's ranks. This counts tensors, not the allocator, so it does not depend on the host's load.
1. k=2 / k=1 at S = --seq (goal <= 0.6).
2. The cap = k=1's bytes at --seq (or --cap-mib); the longest S (a multiple of 256) whose micro-step stays under
   the cap and whose backward gives finite gradients, found by doubling then bisection, at k=1 and at k=2
   (goal ~2x). k=1 runs on rank 0 alone (rank 1 waits).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

STEP = 256  # granularity of the searched sequence length (a multiple of k)


def build_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).float()


def pair(S: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(S)
    half = S // 2
    return {"prompt_ids": [1] + rng.integers(3, 2048, half - 1).tolist(),
            "chosen_ids": rng.integers(3, 2048, half - 1).tolist() + [2],
            "rejected_ids": rng.integers(3, 2048, half - 1).tolist() + [2]}


def micro_step(model, S: int, sp) -> tuple[int, bool]:
    """(bytes held for backward at the end of the forward, gradients finite) of one micro-step on a pair of S."""
    import torch

    from midpo.core.batching import DENSE_MASK_ROW_TOKENS, collate_pairs
    from midpo.core.logprobs import response_logps
    from midpo.core.seqpar import SeqShard, local_count
    from midpo.runtime import dist as pdist
    from midpo.runtime.engine import HEAD_CHUNK_TOKENS

    k = 1 if sp is None else sp.size
    batch = collate_pairs([pair(S)], layout="packed", pad_id=0, max_row_tokens=DENSE_MASK_ROW_TOKENS,
                          pad_to_multiple=k)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            held[s.data_ptr()] = s.nbytes()
        return t

    # k=1 runs the same dense-input path as a group of one (SeqShard(0, 1)): the same masks (none for a row
    # holding one causal sequence), so the ratio is sequence parallelism's alone
    shard = SeqShard(0, 1, lambda local, counts: local) if sp is None else sp.shard
    n = local_count(batch.logit_index, batch.input_ids.shape[1], shard)
    calls = max(1, -(-(n if sp is None else pdist.all_max(n)) // HEAD_CHUNK_TOKENS))  # as PolicyLogps does
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = response_logps(model, batch, shard=shard, head_calls=calls)
        loss = -torch.nn.functional.logsigmoid(0.1 * (out.chosen_sum - out.rejected_sum)).mean()
    forward_bytes = sum(held.values())
    loss.backward()
    finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return forward_bytes, finite


def longest_under(fits, start: int) -> int:
    """The largest multiple of STEP for which fits(S) holds, given fits(start): doubling, then bisection."""
    lo, hi = start, start * 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > STEP:
        mid = (lo + hi) // 2 // STEP * STEP
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def worker(a) -> None:
    import copy

    import torch

    from midpo.runtime import dist as pdist
    from midpo.runtime.seqpar import install, setup_groups

    torch.set_num_threads(1)
    pdist.init_distributed()
    sp = setup_groups(2)
    plain = build_model()
    sharded = copy.deepcopy(plain)
    install(sharded, sp)
    rank0 = pdist.rank() == 0
    res: dict = {"seq": a.seq, "rows_tokens": [a.seq, a.seq]}

    def at_k2(S: int) -> tuple[int, bool]:
        b, ok = micro_step(sharded, S, sp)
        return pdist.all_max(b), pdist.all_ranks_true(ok)

    t0 = time.perf_counter()
    one = micro_step(plain, a.seq, None) if rank0 else (0, True)
    one = pdist.broadcast_object(one)
    two = at_k2(a.seq)
    res.update(k1_bytes=one[0], k2_bytes=two[0], activation_ratio=two[0] / one[0], finite=one[1] and two[1])
    cap = int(a.cap_mib * 2 ** 20) or one[0]
    res["cap_bytes"] = cap
    trials: dict[str, list] = {"k1": [], "k2": []}

    def fits1(S: int) -> bool:
        b, ok = micro_step(plain, S, None)
        trials["k1"].append([S, b])
        return ok and b <= cap

    def fits2(S: int) -> bool:
        b, ok = at_k2(S)
        trials["k2"].append([S, b])
        return ok and b <= cap

    start = a.seq if cap >= one[0] else STEP
    longest1 = longest_under(fits1, start) if rank0 else 0
    longest1 = pdist.broadcast_object(longest1)
    longest2 = longest_under(fits2, start)
    res.update(longest_k1=longest1, longest_k2=longest2, longest_ratio=longest2 / longest1,
               trials=trials if rank0 else None, seconds=round(time.perf_counter() - t0, 1))
    if rank0:
        print("SP_BENCH " + json.dumps(res), flush=True)
    pdist.barrier()
    pdist.cleanup()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence of the measured pair (multiple of 256)")
    p.add_argument("--cap-mib", type=float, default=0.0, help="activation cap; 0 = k=1's bytes at --seq")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return 0
    from plan_bench import worker_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--worker", "--seq", str(a.seq), "--cap-mib", str(a.cap_mib)]
    env = worker_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("SP_BENCH ")), None)
    if proc.returncode or line is None:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        return 1
    r = json.loads(line.removeprefix("SP_BENCH "))
    mib = 2 ** 20
    print(f"sp_bench: small Llama (h128 L2 4h/2kv, fp32, sdpa), one pair of 2 x {r['seq']}-token sequences, "
          f"2 CPU processes (gloo); {os.cpu_count()} CPUs on the host")
    print(f"  activation memory per rank (held for backward): k=1 {r['k1_bytes'] / mib:.1f} MiB, "
          f"k=2 {r['k2_bytes'] / mib:.1f} MiB -> ratio {r['activation_ratio']:.3f} (goal <= 0.6)")
    print(f"  longest pair under a {r['cap_bytes'] / mib:.1f} MiB cap: k=1 {r['longest_k1']} tokens per sequence, "
          f"k=2 {r['longest_k2']} -> ratio {r['longest_ratio']:.2f} (goal ~2)")
    print(f"  gradients finite: {r['finite']}; {r['seconds']} s; trials (S, bytes): {json.dumps(r['trials'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
