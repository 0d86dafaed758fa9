"""Sequence-parallel checks in ONE torchrun launch of 2 CPU processes (gloo), each an independent reference:

    torchrun --nproc_per_node 2 tests/support/sp_check.py OUT_DIR [TRAIN_RECIPE override ...]

1. forward: per-token log-probs and gradients of the SP forward (k=2, runtime.seqpar) equal the plain one-process
   forward of the same model, under sdpa and eager, for the packed, padded and shared layouts; the batch holds a
   pair longer than a packed row (DENSE_MASK_ROW_TOKENS) and packed rows whose sequences straddle the shard
   boundary, and the head runs in 3 calls per rank (some spans empty).
2. `midpo ref` with ref.sequence_parallel=2 on the same processes: its cache equals the plain forward's per-token
   values for every row (the long pair included).
3. the other families (tests/support/families.py: Mistral's and Gemma 2's sliding windows, Gemma 2's soft-capping
   under eager, Qwen2-MoE's routed experts): the SP forward's log-probs equal the plain forward's, every layout.
4. (with TRAIN_RECIPE) `midpo train` on the same processes with the recipe and overrides (train.sequence_parallel=2):
   the test compares its logs and export with a one-process run.
Rank 0 writes OUT_DIR/result.json; the test asserts on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

LONG = 600  # tokens of the long pair's sequences: past a 512-token packed row


def tiny_model(path: Path) -> Path:
    """A tiny Llama with positions for the long pair (4 heads, 2 key/value heads: k=2 splits both)."""
    from train_helpers import BOS, EOS, PAD, VOCAB
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path, safe_serialization=True)
    return path


def rows_with_a_long_pair(seed: int) -> list[dict]:
    import numpy as np
    from train_helpers import BOS, EOS, make_rows

    rng = np.random.default_rng(seed)
    long = {"id": f"row-{seed}-long", "prompt_ids": [BOS] + rng.integers(3, 100, 299).tolist(),
            "chosen_ids": rng.integers(3, 100, LONG - 301).tolist() + [EOS],
            "rejected_ids": rng.integers(3, 100, LONG - 351).tolist() + [EOS]}
    return make_rows(5, seed, max_len=30) + [long]


def check_forward(model_dir: Path, sp) -> dict:
    from transformers import AutoModelForCausalLM

    from midpo.core.batching import DENSE_MASK_ROW_TOKENS, collate_pairs
    from midpo.core.logprobs import response_logps
    from midpo.core.seqpar import owners
    from midpo.runtime.seqpar import install

    rows = rows_with_a_long_pair(3)
    out = {}
    for impl in ("sdpa", "eager"):
        plain = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl, dtype=torch.float32)
        sharded = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl, dtype=torch.float32)
        install(sharded, sp)
        for layout in ("packed", "padded", "shared"):
            kw = {"layout": layout, "pad_id": 0, "max_row_tokens": DENSE_MASK_ROW_TOKENS}
            b1, b2 = collate_pairs(rows, **kw), collate_pairs(rows, **kw, pad_to_multiple=sp.size)
            plain.zero_grad()
            sharded.zero_grad()
            a = response_logps(plain, b1)
            b = response_logps(sharded, b2, shard=sp.shard, head_calls=3)
            # a loss that weighs every token differently, so a misplaced value or gradient shows
            w_c = torch.linspace(0.5, 1.5, a.chosen.shape[1])
            w_r = torch.linspace(1.5, 0.2, a.rejected.shape[1])
            ((a.chosen * w_c).sum() - (a.rejected * w_r).sum()).backward()
            ((b.chosen * w_c).sum() - (b.rejected * w_r).sum()).backward()
            grads = [p.grad.clone() for p in sharded.parameters()]
            for g in grads:  # the group's gradients sum to the batch's
                torch.distributed.all_reduce(g, group=sp.group)
            T = b2.input_ids.shape[1]
            seg = b2.segment_ids if layout == "packed" else None
            straddle = 0
            if seg is not None:  # sequences with tokens on both sides of the shard boundary of their row
                left, right = seg[:, : T // 2], seg[:, T // 2:]
                straddle = sum(len((set(left[r].tolist()) & set(right[r].tolist())) - {b2.seq_lens.numel()})
                               for r in range(seg.shape[0]))
            owner, _ = owners(b2.logit_index, T, sp.size)
            out[f"{impl}/{layout}"] = {
                "chosen": float((a.chosen - b.chosen).abs().max()),
                "rejected": float((a.rejected - b.rejected).abs().max()),
                "masks_equal": bool(torch.equal(a.chosen_mask, b.chosen_mask)
                                    and torch.equal(a.rejected_mask, b.rejected_mask)),
                "grad": max(float((p.grad - g).abs().max()) for p, g in zip(plain.parameters(), grads, strict=True)),
                "grad_scale": max(float(p.grad.abs().max()) for p in plain.parameters()),
                "straddling_sequences": straddle,
                "tokens_per_rank": torch.bincount(owner, minlength=sp.size).tolist(),
                "longest_sequence": int(b2.seq_lens.max()), "row_width": T,
            }
    return out


SP_FAMILIES = ("mistral", "gemma2", "qwen2-moe")


def random_rows(rng, n: int) -> list[dict]:
    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(3, 60) for _ in range(rng.randint(lo, hi))]

    return [{"prompt_ids": ids(5, 40), "chosen_ids": ids(20, 60), "rejected_ids": ids(3, 60)} for _ in range(n)]


def check_families(root: Path, sp) -> dict:
    import random

    from families import build_family
    from transformers import AutoModelForCausalLM

    from midpo.core.batching import DENSE_MASK_ROW_TOKENS, collate_pairs
    from midpo.core.logprobs import response_logps
    from midpo.runtime import dist as pdist
    from midpo.runtime.seqpar import install

    out = {}
    for name in SP_FAMILIES:
        d = root / name
        if pdist.is_main():
            build_family(name, d)
        pdist.barrier()
        cfg = json.loads((d / "config.json").read_text())
        rows = random_rows(random.Random(0), 5)
        for impl in ("eager",) if cfg["model_type"] == "gemma2" else ("sdpa", "eager"):  # gemma2: eager only
            plain, sharded = (AutoModelForCausalLM.from_pretrained(d, attn_implementation=impl, dtype=torch.float32)
                              for _ in range(2))
            install(sharded, sp)
            for layout in ("packed", "padded", "shared"):
                kw = {"layout": layout, "pad_id": 0, "max_row_tokens": DENSE_MASK_ROW_TOKENS}
                with torch.no_grad():
                    a = response_logps(plain, collate_pairs(rows, **kw))
                    b = response_logps(sharded, collate_pairs(rows, **kw, pad_to_multiple=sp.size), shard=sp.shard,
                                       head_calls=2)
                out[f"{name}/{impl}/{layout}"] = {
                    "diff": max(float((a.chosen - b.chosen).abs().max()), float((a.rejected - b.rejected).abs().max())),
                    "window": cfg.get("sliding_window"), "longest_row": max(len(r["prompt_ids"]) + len(r["chosen_ids"])
                                                                            for r in rows)}
    return out


def check_ref_stage(root: Path, model_dir: Path) -> dict:
    import numpy as np
    from datasets import load_from_disk
    from train_helpers import write_data
    from transformers import AutoModelForCausalLM

    from midpo.config import load_config
    from midpo.runtime import dist as pdist
    from midpo.stages import ref
    from midpo.stages.ref import score_reference_rows

    run = root / "run"
    rows = {"train": rows_with_a_long_pair(1), "eval": rows_with_a_long_pair(2)[:3]}
    if pdist.is_main():
        write_data(run / "data", rows)
        (root / "recipe.yaml").write_text(
            f"run_dir: {run}\nmodel:\n  reference: {model_dir}\n  dtype: fp32\n  attn_implementation: sdpa\n"
            "ref:\n  rows_per_shard: 4\n  micro_batch_tokens: 256\n  sequence_parallel: 2\n")
    pdist.barrier()
    ref.main(load_config(root / "recipe.yaml"))
    result = {}
    if pdist.is_main():
        plain = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
        manifest = json.loads((run / "ref" / "manifest.json").read_text())
        result["world_size"] = manifest["world_size"]
        for split, rs in rows.items():
            cache = load_from_disk(str(run / "ref" / split))
            worst = 0.0
            for i, r in enumerate(rs):  # one row at a time: an independent plain forward per pair
                want = score_reference_rows(plain, [r], packing=True, pad_id=0)[0]
                for side in ("chosen", "rejected"):
                    got = np.asarray(cache[i][f"{side}_ref_logps"])
                    assert cache[i]["id"] == r["id"] and len(got) == len(r[f"{side}_ids"])
                    worst = max(worst, float(np.abs(got - want[f"{side}_ref_logps"]).max()))
            result[split] = {"rows": len(cache), "max_abs_diff": worst}
    return result


def main(out_dir: str, train: list[str]) -> int:
    from midpo.config import load_config
    from midpo.runtime import dist as pdist
    from midpo.runtime.seqpar import setup_groups
    from midpo.stages import train as train_stage

    pdist.init_distributed()
    out = Path(out_dir)
    model_dir = out / "model"
    if pdist.is_main():
        tiny_model(model_dir)
    pdist.barrier()
    sp = setup_groups(2)
    import time
    t0 = time.time()
    result = {"forward": check_forward(model_dir, sp)}
    t1 = time.time()
    result["ref"] = check_ref_stage(out / "refrun", model_dir)
    result["families"] = check_families(out / "families", sp)
    t2 = time.time()
    if train:
        train_stage.main(load_config(train[0], train[1:]))
    result["seconds"] = {"forward": t1 - t0, "ref": t2 - t1, "train": time.time() - t2}
    if pdist.is_main():
        (out / "result.json").write_text(json.dumps(result, indent=1))
    pdist.barrier()
    pdist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
