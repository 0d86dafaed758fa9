"""Step time of MI-DPO proper (`loss.prior=learned`) vs DPO: same model, same data, same steps.

Not a test; prints a table. The model and data are bench/train_bench.py's (Llama h256, 4 layers, vocab 2048,
512 sorting pairs, micro-batch 8); the prior network is the reference's first quarter of layers
(prior_net.num_layers = 1 of 4) with the default `marginal` objective (it needs the policy logits, so the
learned run also pays for them). One process, ZeRO-3 (CPU: zero3_cpu_fp32), or
`--ds-config zero2_cpu_fp32` (ZeRO-2 for the policy and the prior, the one-device pick). The runs are interleaved
(dpo, learned, dpo, learned, ...) so that load from other users of a shared machine hits both alike; every
round is reported, with the ratio of medians and of the fastest runs. Goal: learned / dpo <= 1.15 (at the
default prior_net.update_every=1; `--update-every k` measures the speed knob: the prior is then updated,
and the policy logits computed, on every k-th step only, log zeta still on every step).

    PYTHONPATH=. python bench/midpo_vs_dpo.py [--steps 12] [--rounds 2] [--threads 2] [--update-every 1] \
        [--ds-config zero3_cpu_fp32]

Step time = seconds per optimizer step from the trainer's own logs (train_metrics.jsonl: global batch /
pairs_per_s; the window includes the prior hook's work), averaged over steps after `--warmup`.
CPU time per step (with psutil): the trainer process's CPU seconds between consecutive metric lines (10 ms
ticks), same steps. On a machine shared with other jobs, wall time also counts the waits for a core; CPU
time does not (cache and memory contention still move both).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import MICRO, REPO, build_base, env, fresh_run  # noqa: E402

LAYERS = 4


def _cpu_per_step(proc: subprocess.Popen, metrics: Path, warmup: int) -> tuple[list[float], str]:
    """Wait for `proc`, sampling its CPU time whenever train_metrics.jsonl gains a line -> CPU s per step
    after `warmup` steps ([] without psutil), and its stderr."""
    import threading

    try:
        import psutil
    except ImportError:
        return [], proc.communicate()[1]
    err: list[str] = []
    t = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)  # keep the pipe drained
    t.start()
    ps, marks, size = psutil.Process(proc.pid), [], -1
    while proc.poll() is None:
        try:
            st = metrics.stat().st_size if metrics.exists() else -1
            if st != size:
                size = st
                lines = metrics.read_text().count("\n")
                c = ps.cpu_times()
                if lines > len(marks):
                    marks += [c.user + c.system] * (lines - len(marks))
        except (psutil.NoSuchProcess, FileNotFoundError):
            break
        time.sleep(0.01)
    proc.wait()
    t.join()
    return [b - a for a, b in zip(marks[warmup:], marks[warmup + 1:])], "".join(err)


def run(root: Path, model: Path, name: str, prior: str, steps: int, threads: int, warmup: int, tag: str,
        update_every: int = 1, ds_config: str = "zero3_cpu_fp32") -> tuple[float, float]:
    """-> (wall s per step from the trainer's log, CPU s per step or nan). The prior engine gets the policy's
    ZeRO stage (prior_net.zero_stage)."""
    run_dir = fresh_run(root, f"{name}_{tag}")
    stage = int(ds_config[4])  # zero2_* / zero3_*
    extra = (f"prior_net:\n  num_layers: {LAYERS // 4}\n  update_every: {update_every}\n  zero_stage: {stage}\n"
             if prior == "learned" else "")
    recipe = run_dir / "recipe.yaml"
    recipe.write_text(
        f"run_dir: {run_dir}\nmodel:\n  policy: {model}\n  dtype: fp32\n  attn_implementation: sdpa\n"
        f"loss:\n  prior: {prior}\n  beta: 0.1\n{extra}train:\n  micro_batch_size: {MICRO}\n  grad_accum: 1\n"
        f"  max_steps: {steps}\n  lr: 1.0e-4\n  export_at_end: false\n  ds_config: {ds_config}\n"
        f"  keep_last: 1\n  save_every: 0\n  eval_every: 0\n  log_every: 1\n  peak_flops: 1.0e11\n")
    metrics = run_dir / "logs" / "train_metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "midpo.stages.train", "--config", str(recipe)], env=env(threads),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cpu, stderr = _cpu_per_step(proc, metrics, warmup)
    if proc.returncode != 0:
        raise RuntimeError(stderr[-4000:])
    rows = [json.loads(x) for x in metrics.read_text().splitlines()][warmup:]
    # means over steps (with update_every > 1, update and other steps alternate: the mean is the cost per step)
    return float(np.mean([MICRO / r["pairs_per_s"] for r in rows])), float(np.mean(cpu)) if cpu else float("nan")


def flop_ratio(hf_config, prior_layers: int, prompt: float, response: float, update_every: int,
               micro: int = 8, chunk: int = 1024) -> float:
    """Expected learned/dpo step time if both were bound by matmul FLOPs (2 x weights x tokens per forward,
    backward 2x forward; attention scores, the KL's softmax and the optimizer left out). Per pair: the
    policy runs all layers on 2P+C+R tokens and the head on the C+R response tokens (DPO from the cache has
    no reference forward). The policy's head runs 3x its forward (forward, two backward matmuls), 4x when a
    micro-batch's response tokens exceed one head chunk (`chunk`, midpo.core.logprobs): the chunks are then
    activation-checkpointed and recomputed -- except on the marginal prior's update steps, where its logits
    are kept for the KL (3x). The unconditioned prior runs its layers and the head on [BOS] + response per side
    (2+C+R): forward every step, backward only on its update steps (one in `update_every`)."""
    h, inter = hf_config.hidden_size, hf_config.intermediate_size
    kv = hf_config.num_key_value_heads * (h // hf_config.num_attention_heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * inter  # q, o; k, v; gate, up, down
    head = h * hf_config.vocab_size
    layers_fwd = hf_config.num_hidden_layers * layer * (2 * prompt + 2 * response)
    head_fwd = head * 2 * response
    prior_fwd = (prior_layers * layer + head) * (2 + 2 * response)
    head_x = 4 if micro * 2 * response > chunk else 3
    dpo = 3 * layers_fwd + head_x * head_fwd
    learned = (3 * layers_fwd + head_fwd * (3 + head_x * (update_every - 1)) / update_every
               + prior_fwd * (update_every + 2) / update_every)
    return learned / dpo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--update-every", type=int, default=1, help="prior_net.update_every of the learned runs")
    ap.add_argument("--ds-config", default="zero3_cpu_fp32", choices=("zero3_cpu_fp32", "zero2_cpu_fp32"),
                    help="policy engine config; the prior engine gets the same ZeRO stage")
    ap.add_argument("--root", default=None)
    a = ap.parse_args()

    root = Path(a.root or tempfile.mkdtemp(prefix="midpo_vs_dpo_"))
    model, rows = build_base(root, a.threads)
    from transformers import AutoConfig

    prompt = float(np.mean([len(r["prompt_ids"]) for r in rows]))
    response = float(np.mean([(len(r["chosen_ids"]) + len(r["rejected_ids"])) / 2 for r in rows]))
    floor = flop_ratio(AutoConfig.from_pretrained(model), LAYERS // 4, prompt, response, a.update_every, MICRO)
    print(f"model: Llama h256 L{LAYERS} vocab 2048, prior = first {LAYERS // 4} layer(s), update_every "
          f"{a.update_every}; micro-batch {MICRO}; {a.steps} steps ({a.warmup} warm-up dropped); {a.threads} threads; "
          f"1 process, {a.ds_config}")
    times: dict[str, list[float]] = {"dpo": [], "learned": []}
    cpus: dict[str, list[float]] = {"dpo": [], "learned": []}
    for r in range(a.rounds):
        for prior in ("dpo", "learned"):
            t, c = run(root, model, prior, prior, a.steps, a.threads, a.warmup, f"r{r}", a.update_every, a.ds_config)
            times[prior].append(t)
            cpus[prior].append(c)
            print(f"round {r}: {prior:8s} {t * 1000:8.1f} ms/step wall {c * 1000:8.1f} ms/step CPU", flush=True)
    ratio = float(np.median(times["learned"]) / np.median(times["dpo"]))
    per_round = [lt / dt for lt, dt in zip(times["learned"], times["dpo"])]
    # On a shared machine outside load only adds time: the fastest run of each is the least disturbed.
    ratio_min = float(min(times["learned"]) / min(times["dpo"]))
    cpu_ratio = float(np.median(cpus["learned"]) / np.median(cpus["dpo"]))
    print(f"learned / dpo step time: {ratio:.3f} (median of rounds), {ratio_min:.3f} (fastest of each); per round: "
          f"{', '.join(f'{x:.3f}' for x in per_round)}; CPU time per step: {cpu_ratio:.3f} (median of rounds); "
          f"goal <= 1.15; matmul-FLOP ratio {floor:.3f} (prompt {prompt:.0f}, response {response:.0f} tokens)")
    print(json.dumps({"ms_per_step": {k: [round(x * 1000, 2) for x in v] for k, v in times.items()},
                      "cpu_ms_per_step": {k: [round(x * 1000, 2) for x in v] for k, v in cpus.items()},
                      "ratio_median": ratio, "ratio_min": ratio_min, "ratio_per_round": per_round,
                      "cpu_ratio_median": cpu_ratio, "flop_ratio": floor, "update_every": a.update_every, "ds_config": a.ds_config,
                      "threads": a.threads}))


if __name__ == "__main__":
    main()
