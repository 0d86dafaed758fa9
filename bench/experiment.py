"""Issue #23's experiment: does a learned prior beat fixed priors? Decision rule: docs/experiment.md (pre-stated).

    python bench/experiment.py --out runs/exp23                              # both tasks, seeds 0..7, all arms
    python bench/experiment.py --out runs/pilot --seeds 0 --val-seeds 100 --methods dpo mi_dpo-marginal --jobs 2
    python bench/experiment.py --out runs/exp23 --report-only                 # tables + plots from finished cells

Tasks: `embedded` (the list task of `midpo run --config tiny`) and `confound` (midpo/demo/confound.py: the rater
also rewards a prompt-independent stock phrase). Per task one shared base is built once (and reused on rerun):
- embedded: `<out>/base`, as `midpo run` builds it (synth -> prep -> SFT -> on-policy pairs -> prep -> ref with
  a top-k=8 cache for TDPO); `--base-from DIR` copies a finished `midpo run` folder's stages in;
- confound: `<out>/confound/base`: the embedded SFT model fine-tuned (`--confound-sft-steps`) on right answers
  that carry the phrase at `--phrase-rate`, its own on-policy pairs rated by the confounded rater
  (`--strength`), prep, ref.
Held-out splits (`<out>/splits`): `test` (reported; `--test-prompts`) and `validation` (the prior lr choice;
`--val-prompts`), disjoint from every training prompt and each other; held-out pairs per task from the
reference's own samples on the test prompts, labelled by correctness only.

Cells: one (task, arm, seed) = `<out>/<task>/cells/<split>/<arm>-s<seed>/`, whose shared stages are symlinks
to the task's base; `midpo train --nproc N` then the measurements; `result.json` is written last and
atomically, so a rerun skips finished cells (and refuses one finished with other settings). Cells fan out over
`--jobs` worker processes. Validation cells (learned arms, `--lrs` x `--val-seeds`, scored on validation only)
run first; the chosen lr is written to `<out>/<task>/lr_choice.json` before a reported learned cell starts.
`dice` = `midpo iterate --rounds R` (labeller implicit_reward) from the same seed's `dpo` model.

Writes `<out>/results.md` (tables, paired intervals and the decision per docs/experiment.md), `results.json`
and, when matplotlib is installed, `accuracy_<task>.png` and `contrasts.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from midpo.cli import split_overrides  # noqa: E402
from midpo.config import load_config  # noqa: E402
from midpo.core.decision import choose_by_validation, decide, mean_interval, paired  # noqa: E402
from midpo.runtime.files import atomic_write_json, atomic_write_text, save_config  # noqa: E402

TASKS = ("embedded", "confound")
METHODS: dict[str, list[str]] = {
    "dpo": ["loss.prior=dpo"],
    "simpo": ["loss.prior=simpo"],
    "tdpo": ["loss.prior=tdpo"],
    "rdpo": ["loss.prior=rdpo", "loss.options.r=0.1"],  # R-DPO has no official default length coefficient
    "mi_dpo-marginal": ["loss.prior=learned", "prior_net.objective=marginal"],
    "mi_dpo-joint": ["loss.prior=learned", "prior_net.objective=joint", "prior_net.anchor=nll"],
    "dice": ["loss.prior=dice", "iterate.start=export", "iterate.labeller=implicit_reward", "iterate.eval_prompts=0"],
}
DEFAULT_METHODS = ["dpo", "simpo", "tdpo", "mi_dpo-marginal", "mi_dpo-joint", "dice"]
LEARNED = ("mi_dpo-marginal", "mi_dpo-joint")
SHARED = ("synth", "sft_data", "sft", "onpolicy", "data", "ref")
PRIMARY = ("embedded", "mi_dpo-marginal", "dpo")  # docs/experiment.md: the one primary contrast
CONTRASTS = [(a, b) for a in LEARNED for b in ("dpo", "simpo")]
DELTA_ACC, DELTA_PHRASE = 0.01, 0.05


# ---------------------------------------------------------------------------------------------
# small helpers


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def link_base(base: Path, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        dst = run_dir / name
        if (base / name).exists() and not dst.exists():
            os.symlink((base / name).resolve(), dst)


def recorded_auto(cfg, config_path: Path) -> list[str]:
    """Overrides `key=value` for the picks a run's config.yaml records under `auto:` (midpo train resolves
    train.ds_config / train.layout there), for the keys `cfg` leaves at "auto"."""
    import functools

    import yaml

    saved = yaml.safe_load(config_path.read_text()) or {}
    return [f"{k}={v['value']}" for k, v in (saved.get("auto") or {}).items()
            if functools.reduce(getattr, k.split("."), cfg) == "auto"]


def lr_tag(lr: float | None) -> str:
    return "" if lr is None else f"-lr{lr:g}"


def _checker(task: str):
    from midpo.demo import confound
    from midpo.demo.task import check_answer

    return confound.check if task == "confound" else check_answer


def sample_answers(model_dir: Path, rows: list[dict], samples: int, temperature: float, seed: int) -> list[list[str]]:
    """`samples` answers per prompt at `temperature` (seeded per sample round), as `midpo sample` draws them."""
    from midpo.config import ModelConfig
    from midpo.demo.evaluate import answer_token_budget, generate_answers
    from midpo.runtime.models import load_model, load_tokenizer

    model = load_model(model_dir, ModelConfig(attn_implementation="sdpa"), train=False)
    tok = load_tokenizer(model_dir)
    budget = answer_token_budget(tok, rows) + 6  # + the stock phrase's tokens
    per: list[list[str]] = [[] for _ in rows]
    for k in range(samples):
        outs = generate_answers(model, tok, [r["prompt"] for r in rows], do_sample=True, temperature=temperature,
                                seed=seed * 1000 + k, max_new_tokens=budget)
        for i, a in enumerate(outs):
            per[i].append(a)
    return per


# ---------------------------------------------------------------------------------------------
# bases, splits, held-out pairs


def build_embedded_base(args, overrides: list[str]) -> Path:
    from midpo.demo.run import prepare_base

    out = args.out
    if args.base_from:
        for name in ("synth", "sft_data", "sft", "onpolicy", "data"):
            src, dst = Path(args.base_from) / name, out / "base" / name
            if src.exists() and not dst.exists():
                shutil.copytree(src, dst, symlinks=True)
    cfg = load_config(args.config, [*overrides, f"run_dir={out / 'base'}", f"ref.topk={args.topk}"])
    timings: dict[str, float] = {}
    path = prepare_base(cfg, args.nproc_base, timings)
    atomic_write_json(out / "base" / "timings.json", timings)
    return path


def build_splits(args, base: Path) -> dict[str, Path]:
    from midpo.demo.confound import held_out_prompts

    d = args.out / "splits"
    paths = {"test": d / "test.jsonl", "validation": d / "validation.jsonl"}
    if all(p.exists() for p in paths.values()):
        return paths
    d.mkdir(parents=True, exist_ok=True)
    cfg = load_config(base / "config.yaml", [])
    s = cfg.synth
    used = {r["prompt"] for f in ("pairs.jsonl", "eval_prompts.jsonl", "onpolicy_prompts.jsonl")
            for r in read_jsonl(base / "synth" / f)}
    test = held_out_prompts(args.test_prompts, s.seed, s.tasks, s.min_items, s.max_items, used, "test")
    val = held_out_prompts(args.val_prompts, s.seed, s.tasks, s.min_items, s.max_items,
                           used | {r["prompt"] for r in test}, "validation")
    write_jsonl(paths["validation"], val)
    write_jsonl(paths["test"], test)
    return paths


def build_confound_base(args, overrides: list[str], embedded_base: Path) -> Path:
    """<out>/confound/base: phrase SFT from the embedded SFT model, rated on-policy pairs, prep, ref."""
    from midpo.data.prepare import prepare
    from midpo.demo import confound
    from midpo.demo.run import _launch
    from midpo.demo.sft import train_sft
    from midpo.runtime.layout import claim_run

    root = args.out / "confound"
    base = root / "base"
    ecfg = load_config(embedded_base / "config.yaml", [])
    synth = embedded_base / "synth"
    sft_pairs = root / "sft_pairs.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    if not sft_pairs.exists():
        write_jsonl(sft_pairs, confound.sft_rows(read_jsonl(synth / "pairs.jsonl"), args.phrase_rate, ecfg.seed))
    cfg = load_config(args.config, [
        *overrides, f"run_dir={base}", f"ref.topk={args.topk}", f"model.policy={(embedded_base / 'sft').resolve()}",
        f"data.inputs=[{sft_pairs}]", f"sft.steps={args.confound_sft_steps}", f"sft.lr={args.confound_sft_lr}",
        f"onpolicy.prompts={(synth / 'onpolicy_prompts.jsonl').resolve()}"])
    layout = claim_run(cfg)
    t: dict[str, float] = {}
    t0 = time.time()
    prepare(cfg.data, cfg.data.inputs, layout.tokenizer, layout.sft_data)
    train_sft(cfg, layout.sft_data, layout.init_model, layout.sft)
    t["sft"] = time.time() - t0
    pairs_file = layout.onpolicy / "pairs.jsonl"
    if not (layout.onpolicy / "confound_manifest.json").exists():
        t0 = time.time()
        recs = read_jsonl(Path(cfg.onpolicy.prompts))
        answers = sample_answers(layout.sft, recs, cfg.onpolicy.samples, cfg.onpolicy.temperature, cfg.seed)
        rows, counts = confound.sample_pairs(recs, answers, strength=args.strength, seed=cfg.seed,
                                             pairs_per_prompt=cfg.onpolicy.pairs_per_prompt)
        layout.onpolicy.mkdir(parents=True, exist_ok=True)
        write_jsonl(pairs_file, rows)
        flat = [a for s in answers for a in s]
        atomic_write_json(layout.onpolicy / "confound_manifest.json", {
            "strength": args.strength, "phrase_rate_sft_data": args.phrase_rate, "counts": dict(counts),
            "pairs_rates": confound.phrase_rates(rows),
            "sample_phrase_rate": sum(map(confound.has_phrase, flat)) / max(1, len(flat)),
            "sample_accuracy": sum(confound.check(r, a) for r, s in zip(recs, answers) for a in s) / max(1, len(flat))})
        t["sample"] = time.time() - t0
    prepare(cfg.data, [str(pairs_file)], layout.tokenizer, layout.data)
    t0 = time.time()
    _launch("ref", layout.config, args.nproc_base)
    t["ref"] = time.time() - t0
    atomic_write_json(base / "timings.json", t)
    return layout.config


def build_heldout_pairs(args, task: str, ref_model: Path, test: Path) -> Path:
    """<out>/<task>/heldout_pairs.jsonl: the reference's samples on the test prompts, labelled by correctness
    only (phrase-discordant pairs first), and the reference's log-probs of both sides (heldout_ref.json)."""
    from midpo.demo import confound

    d = args.out / task
    path, ref_path = d / "heldout_pairs.jsonl", d / "heldout_ref.json"
    if path.exists() and ref_path.exists():
        return path
    d.mkdir(parents=True, exist_ok=True)
    recs = read_jsonl(test)
    answers = sample_answers(ref_model, recs, args.heldout_samples, 1.0, seed=424242)
    rows, counts = confound.sample_pairs(recs, answers, strength=0.0, seed=0, pairs_per_prompt=2)  # as training
    scores = score_pairs(ref_model, rows)
    write_jsonl(path, rows)
    atomic_write_json(ref_path, {"counts": dict(counts), "rates": confound.phrase_rates(rows), "scores": scores})
    return path


def score_pairs(model_dir: Path, rows: list[dict]) -> dict[str, list[float]]:
    from midpo.config import ModelConfig
    from midpo.demo.measures import score_answers
    from midpo.runtime.models import load_model, load_tokenizer

    model = load_model(model_dir, ModelConfig(attn_implementation="sdpa"), train=False)
    tok = load_tokenizer(model_dir)
    prompts = [r["prompt"] for r in rows]
    return {side: [x["logp"] for x in score_answers(model, tok, prompts, [r[side] for r in rows])]
            for side in ("chosen", "rejected")}


def greedy_eval(task: str, model_dir: Path, prompts: Path) -> dict:
    from midpo.config import ModelConfig
    from midpo.demo.confound import has_phrase
    from midpo.demo.evaluate import answer_token_budget, generate_answers
    from midpo.runtime.models import load_model, load_tokenizer

    rows = read_jsonl(prompts)
    model = load_model(model_dir, ModelConfig(attn_implementation="sdpa"), train=False)
    tok = load_tokenizer(model_dir)
    answers = generate_answers(model, tok, [r["prompt"] for r in rows], max_new_tokens=answer_token_budget(tok, rows) + 6)
    check = _checker(task)
    scores = [check(r, a) for r, a in zip(rows, answers)]
    return {"n": len(rows), "accuracy": sum(scores) / len(rows), "scores": scores,
            "phrase_rate": sum(map(has_phrase, answers)) / len(rows), "examples": answers[:3]}


# ---------------------------------------------------------------------------------------------
# one cell


@dataclasses.dataclass(frozen=True)
class Cell:
    task: str
    method: str
    seed: int
    split: str  # "test" (reported) | "validation" (lr choice)
    lr: float | None  # prior_net.lr of a learned arm

    @property
    def name(self) -> str:
        return f"{self.method}{lr_tag(self.lr)}-s{self.seed}"


def cell_dir(out: Path, c: Cell) -> Path:
    return out / c.task / "cells" / c.split / c.name


def task_base(out: Path, task: str) -> Path:
    return out / "base" if task == "embedded" else out / "confound" / "base"


def run_cell(out: Path, c: Cell, overrides: list[str], settings: dict) -> dict:
    """Train and measure one cell (skipped when its result.json exists for the same settings)."""
    import torch

    from midpo.demo.run import _launch, _read_last_eval

    # threads per process fixed by the script (cores / cells at once): more oversubscribes the cores (two cells
    # of 2 threads on 2 cores ran 3-4x slower, OpenMP spinning), and the count is part of what a rerun reproduces
    os.environ["OMP_NUM_THREADS"] = str(settings["threads"])  # the `midpo train` / `midpo iterate` children
    torch.set_num_threads(settings["threads"])  # the measurements, here
    run_dir = cell_dir(out, c)
    base = task_base(out, c.task)
    extra = [f"prior_net.lr={c.lr}"] if c.lr is not None else []
    cell_overrides = [*overrides, *METHODS[c.method], *extra, f"run_dir={run_dir}", f"seed={c.seed}",
                      f"train.seed={c.seed}", f"train.grad_accum={settings['grad_accum']}"]
    if c.method == "dice":
        cell_overrides.append(f"iterate.rounds={settings['dice_rounds']}")
    cfg = load_config(base / "config.yaml", cell_overrides)
    result_file = run_dir / "result.json"
    if result_file.exists():
        # a finished cell is reused only for the same settings: never report an old run under new ones
        old = load_config(run_dir / "config.yaml", []) if (run_dir / "config.yaml").exists() else None
        if old is not None:  # the trainer records what `auto` chose: compare with those picks in place of "auto"
            cfg = load_config(base / "config.yaml", cell_overrides + recorded_auto(cfg, run_dir / "config.yaml"))
        if old is None or dataclasses.asdict(old) != dataclasses.asdict(cfg):
            raise SystemExit(f"{run_dir} holds a finished cell with other settings ({run_dir / 'config.yaml'}): "
                             "pass another --out, or delete that folder")
        done = json.loads(result_file.read_text())
        if done.get("threads") != settings["threads"]:
            raise SystemExit(f"{run_dir} was trained with {done.get('threads', 'an unrecorded number of')} threads per "
                             f"process, this run uses {settings['threads']} (--jobs): pass another --out, or the "
                             "--jobs it was run with")
        return done
    link_base(base, run_dir)
    t = time.time()
    if c.method == "dice":
        dpo = cell_dir(out, dataclasses.replace(c, method="dpo", lr=None))
        if not (dpo / "result.json").exists():
            raise SystemExit(f"dice s{c.seed}: the dpo cell {dpo} is not finished (dice starts from its export)")
        if not (run_dir / "export").exists():
            os.symlink((dpo / "export").resolve(), run_dir / "export")
        cfg_path = save_config(cfg, run_dir / "config.yaml")
        _iterate(cfg_path, settings["dice_rounds"])
        policy = run_dir / "rounds" / f"r{settings['dice_rounds']}" / "export"
    else:
        cfg_path = save_config(cfg, run_dir / "config.yaml")
        _launch("train", cfg_path, settings["nproc"])
        policy = run_dir / "export"
    train_s = time.time() - t
    t = time.time()
    res = {"task": c.task, "method": c.method, "seed": c.seed, "split": c.split, "lr": c.lr,
           "train_seconds": round(train_s, 1), "threads": settings["threads"]}
    res.update(measure(out, c, policy, cfg, settings))
    res["trainer_eval"] = _read_last_eval(run_dir) if c.method != "dice" else {}
    metrics = [json.loads(x) for x in (run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()
               if x.strip()] if (run_dir / "logs" / "train_metrics.jsonl").exists() else []
    kls = [m["prior/kl_policy"] for m in metrics if "prior/kl_policy" in m]
    res["train_prior_kl_policy_last"] = kls[-1] if kls else None
    res["measure_seconds"] = round(time.time() - t, 1)
    atomic_write_json(result_file, res)
    print(f"--- {c.task} {c.split} {c.name}: acc {res['accuracy']:.3f}, phrase {res['phrase_rate']:.3f}, "
          f"train {train_s:.0f}s, measure {res['measure_seconds']:.0f}s", flush=True)
    return res


def _iterate(cfg_path: Path, rounds: int) -> None:
    import subprocess

    from midpo.demo.run import _LAUNCHER_VARS

    cmd = [sys.executable, "-m", "midpo.cli", "iterate", "--config", str(cfg_path), "--rounds", str(rounds),
           "--nproc", "1"]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")}
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed with exit code {rc}")


def measure(out: Path, c: Cell, policy: Path, cfg, settings: dict) -> dict:
    """Greedy accuracy + phrase rate on the cell's split; on test also the common-yardstick reward accuracy on
    the held-out pairs, KL(pi || pi_ref) and KL(pi || zeta) per token on sampled answers."""
    from midpo.config import ModelConfig
    from midpo.demo.measures import per_token, score_answers
    from midpo.runtime.models import load_model, load_tokenizer

    split_file = out / "splits" / f"{c.split}.jsonl"
    ev = greedy_eval(c.task, policy, split_file)
    res = {"accuracy": ev["accuracy"], "phrase_rate": ev["phrase_rate"], "scores": ev["scores"], "n": ev["n"]}
    if c.split != "test":
        return res
    mc = ModelConfig(attn_implementation="sdpa")
    pol, tok = load_model(policy, mc, train=False), load_tokenizer(policy)
    # common yardstick: log pi - log pi_ref on the held-out pairs (the reference's side cached per task)
    pairs = read_jsonl(out / c.task / "heldout_pairs.jsonl")
    ref_scores = json.loads((out / c.task / "heldout_ref.json").read_text())["scores"]
    prompts = [r["prompt"] for r in pairs]
    pc = score_answers(pol, tok, prompts, [r["chosen"] for r in pairs])
    pr = score_answers(pol, tok, prompts, [r["rejected"] for r in pairs])
    wins = [(a["logp"] - ra) > (b["logp"] - rb) for a, b, ra, rb in zip(pc, pr, ref_scores["chosen"], ref_scores["rejected"])]
    res["heldout_reward_accuracy"] = sum(wins) / max(1, len(wins))
    res["heldout_pairs"] = len(wins)
    # KL on answers sampled from pi (T = 1) on the first kl_prompts test prompts
    recs = read_jsonl(split_file)[: settings["kl_prompts"]]
    answers = [s[0] for s in sample_answers(policy, recs, 1, 1.0, seed=c.seed + 7)]
    ref = load_model(task_base(out, c.task) / "sft", mc, train=False)
    prior_dir = policy / "prior"
    prior = load_model(prior_dir, mc, train=False) if (prior_dir / "config.json").exists() else None
    bos = cfg.prior_net.bos_token_id if cfg.prior_net.bos_token_id is not None else tok.bos_token_id
    rows = score_answers(pol, tok, [r["prompt"] for r in recs], answers, reference=ref, prior=prior, bos_id=bos)
    res["kl_ref_per_token"] = per_token(rows, "kl_ref")
    res["kl_prior_per_token"] = per_token(rows, "kl_prior") if prior is not None else None
    res["sampled_tokens_mean"] = sum(r["tokens"] for r in rows) / max(1, len(rows))
    return res


def _run_cell_job(out: str, c: Cell, overrides: list[str], settings: dict) -> tuple[Cell, dict | None, str | None]:
    try:
        return c, run_cell(Path(out), c, overrides, settings), None
    except (SystemExit, Exception) as e:  # one failing cell must not lose the others
        return c, None, f"{e}\n{traceback.format_exc(limit=3)}"


# ---------------------------------------------------------------------------------------------
# lr choice, report


def choose_lr(results: list[dict], task: str, method: str, lrs: list[float]) -> dict | None:
    """docs/experiment.md: the highest mean validation accuracy over the validation seeds; within 0.002 the
    smaller lr. None until every (lr, seed) validation cell is done."""
    by = {lr: [r["accuracy"] for r in results if r["task"] == task and r["method"] == method
               and r["split"] == "validation" and r["lr"] == lr] for lr in lrs}
    if any(not v for v in by.values()):
        return None
    means = {lr: sum(v) / len(v) for lr, v in by.items()}
    chosen = choose_by_validation(means)
    return {"lr": chosen, "validation_means": {f"{lr:g}": m for lr, m in means.items()},
            "validation_seeds": sorted({r["seed"] for r in results if r["task"] == task and r["method"] == method
                                        and r["split"] == "validation"})}


def _fmt(iv: dict, digits: int = 3) -> str:
    if iv["n"] == 0 or math.isnan(iv["mean"]):
        return "-"
    if iv["n"] < 2:
        return f"{iv['mean']:.{digits}f} (1 seed)"
    return f"{iv['mean']:.{digits}f} ± {iv['half']:.{digits}f}"


def _by_seed(results: list[dict], task: str, method: str, key: str) -> dict[int, float]:
    return {r["seed"]: r[key] for r in results if r["task"] == task and r["method"] == method and r["split"] == "test"
            and r.get(key) is not None}


def report(out: Path, results: list[dict], methods: list[str], tasks: list[str], failed: list[str], header: str) -> str:
    lines = [header]
    for task in tasks:
        ref_file = out / task / "reference_eval.json"
        ref = json.loads(ref_file.read_text()) if ref_file.exists() else None
        lines += [f"\n## Task `{task}`\n"]
        if ref:
            lines.append(f"reference (SFT): test greedy accuracy {ref['test']['accuracy']:.3f} (n={ref['test']['n']}), "
                         f"phrase rate {ref['test']['phrase_rate']:.3f}; validation accuracy "
                         f"{ref['validation']['accuracy']:.3f}; held-out pairs {ref.get('heldout_pairs', '-')}\n")
        lr_file = out / task / "lr_choice.json"
        if lr_file.exists():
            for m, ch in json.loads(lr_file.read_text()).items():
                lines.append(f"prior lr ({m}), chosen on validation: **{ch['lr']:g}** (validation means "
                             + ", ".join(f"{k}: {v:.3f}" for k, v in ch["validation_means"].items())
                             + f"; seeds {ch['validation_seeds']})\n")
        lines += ["| arm | seeds | task acc (95% t) | phrase rate | held-out reward acc, common (log pi/pi_ref) | "
                  "held-out reward acc, own prior (trainer) | KL(pi‖pi_ref)/token | KL(pi‖zeta)/token | "
                  "train prior/kl_policy | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            rs = [r for r in results if r["task"] == task and r["method"] == m and r["split"] == "test"]
            if not rs:
                continue

            def iv(key, rs=rs):
                return mean_interval([r[key] for r in rs if r.get(key) is not None])
            own = mean_interval([r["trainer_eval"]["rewards/accuracies"] for r in rs
                                 if "rewards/accuracies" in (r.get("trainer_eval") or {})])
            lines.append(f"| {m}{lr_tag(rs[0]['lr'])} | {len(rs)} | {_fmt(iv('accuracy'))} | {_fmt(iv('phrase_rate'))} | "
                         f"{_fmt(iv('heldout_reward_accuracy'))} | {_fmt(own)} | {_fmt(iv('kl_ref_per_token'))} | "
                         f"{_fmt(iv('kl_prior_per_token'))} | {_fmt(iv('train_prior_kl_policy_last'))} | "
                         f"{iv('train_seconds')['mean']:.0f} |")
        lines += ["\nPaired per-seed differences (learned arm minus baseline, same seeds), 95% t-interval, and the "
                  "reading per docs/experiment.md:\n",
                  "| contrast | metric | seeds | mean [95% interval] | reading | per seed (seed: difference) |",
                  "|---|---|---|---|---|---|"]
        for a, b in CONTRASTS:
            for key, delta, hib in (("accuracy", DELTA_ACC, True),
                                    *((("phrase_rate", DELTA_PHRASE, False),) if task == "confound" else ()),
                                    ("heldout_reward_accuracy", None, True)):
                p = paired(_by_seed(results, task, a, key), _by_seed(results, task, b, key))
                if p["n"] == 0:
                    continue
                tag = "**primary**" if (task, a, b) == PRIMARY and key == "accuracy" else "secondary"
                reading = decide(p, delta, hib) if delta is not None else "(no rule: secondary metric)"
                if key == "phrase_rate":  # docs/experiment.md's words for the confound's rule
                    reading = {"beats": "resists the confound better", "worse": "follows it more"}.get(reading, reading)
                rng = f"{p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]" if p["n"] > 1 else f"{p['mean']:+.4f} (1 seed)"
                per_seed = ", ".join(f"{sd}: {d:+.3f}" for sd, d in zip(p["seeds"], p["diffs"], strict=True))
                lines.append(f"| {a} − {b} ({tag}) | {key} | {p['n']} | {rng} | {reading} | {per_seed} |")
    if failed:
        lines += ["\nFAILED cells:"] + [f"- {f.splitlines()[0]}" for f in failed]
    return "\n".join(lines) + "\n"


def plots(out: Path, results: list[dict], methods: list[str], tasks: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in tasks:
        names = [m for m in methods if _by_seed(results, task, m, "accuracy")]
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(8, 4))
        for i, m in enumerate(names):
            accs = list(_by_seed(results, task, m, "accuracy").values())
            iv = mean_interval(accs)
            ax.bar(i, iv["mean"], yerr=0 if math.isnan(iv["half"]) else iv["half"], color=f"C{i}", alpha=0.8, capsize=4)
            ax.scatter([i] * len(accs), accs, color="k", s=10, zorder=3)
        ref_file = out / task / "reference_eval.json"
        if ref_file.exists():
            ax.axhline(json.loads(ref_file.read_text())["test"]["accuracy"], color="gray", ls="--", label="reference (SFT)")
            ax.legend()
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set(ylabel="greedy task accuracy (test)", title=f"{task}: accuracy by arm (mean, 95% t over seeds)")
        fig.tight_layout()
        p = out / f"accuracy_{task}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    rows = []
    for task in tasks:
        for a, b in CONTRASTS:
            p = paired(_by_seed(results, task, a, "accuracy"), _by_seed(results, task, b, "accuracy"))
            if p["n"] > 1:
                rows.append((f"{task}: {a} − {b}", p))
    if rows:
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
        for i, (_label, p) in enumerate(rows):
            ax.errorbar(p["mean"], i, xerr=p["half"], fmt="o", capsize=4)
        for x in (-DELTA_ACC, 0, DELTA_ACC):
            ax.axvline(x, color="gray", ls="--" if x else "-", lw=0.8)
        ax.set_yticks(range(len(rows)), [r[0] for r in rows])
        ax.set(xlabel="paired difference in task accuracy (95% t over seeds); dashed: ±delta")
        fig.tight_layout()
        p = out / "contrasts.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    return written


# ---------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    import logging
    import platform

    argv, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--out", default="runs/exp23")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(8)))
    p.add_argument("--val-seeds", nargs="+", type=int, default=[100, 101])
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 1e-3, 3e-3], help="prior_net.lr candidates")
    p.add_argument("--jobs", type=int, default=2, help="cells trained at once (worker processes)")
    p.add_argument("--nproc", type=int, default=1, help="training processes per cell")
    p.add_argument("--nproc-base", type=int, default=2, help="processes of the bases' ref stages")
    p.add_argument("--global-batch", type=int, default=16, help="kept fixed: grad_accum = this / (micro x nproc)")
    p.add_argument("--test-prompts", type=int, default=3000)
    p.add_argument("--val-prompts", type=int, default=1000)
    p.add_argument("--heldout-samples", type=int, default=8)
    p.add_argument("--kl-prompts", type=int, default=500)
    p.add_argument("--topk", type=int, default=8, help="reference top-k cache for TDPO (ref.topk)")
    p.add_argument("--strength", type=float, default=0.5, help="confound strength (docs/experiment.md)")
    p.add_argument("--phrase-rate", type=float, default=0.3, help="stock phrase rate of the confound SFT data")
    p.add_argument("--confound-sft-steps", type=int, default=300)
    p.add_argument("--confound-sft-lr", type=float, default=1e-3)
    p.add_argument("--dice-rounds", type=int, default=3)
    p.add_argument("--base-from", help="a finished `midpo run` folder of the same recipe: its synth, data, SFT and "
                   "on-policy pairs are copied into <out>/base")
    p.add_argument("--report-only", action="store_true", help="write the tables from finished cells; train nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out = Path(args.out).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    micro = load_config(args.config, overrides).train.micro_batch_size
    if args.global_batch % (micro * args.nproc):
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of micro {micro} x nproc {args.nproc}")
    settings = {"grad_accum": args.global_batch // (micro * args.nproc), "nproc": args.nproc,
                "kl_prompts": args.kl_prompts, "dice_rounds": args.dice_rounds,
                "threads": max(1, (os.cpu_count() or 1) // (args.jobs * args.nproc))}
    cells_all: list[Cell] = []
    results: list[dict] = []
    failed: list[str] = []
    timings: dict[str, float] = {}

    if not args.report_only:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        t = time.time()
        embedded_cfg = build_embedded_base(args, overrides)
        timings["embedded_base"] = time.time() - t
        base = embedded_cfg.parent
        splits = build_splits(args, base)
        for task in args.tasks:
            t = time.time()
            if task == "confound":
                build_confound_base(args, overrides, base)
            ref_model = task_base(args.out, task) / "sft"
            build_heldout_pairs(args, task, ref_model, splits["test"])
            ref_file = args.out / task / "reference_eval.json"
            if not ref_file.exists():
                ev = {s: greedy_eval(task, ref_model, splits[s]) for s in ("test", "validation")}
                ev["heldout_pairs"] = len(read_jsonl(args.out / task / "heldout_pairs.jsonl"))
                atomic_write_json(ref_file, ev)
            timings[f"{task}_setup"] = time.time() - t

    def pool_run(cells: list[Cell]) -> None:
        if args.report_only:
            results.extend(json.loads((cell_dir(args.out, c) / "result.json").read_text()) for c in cells
                           if (cell_dir(args.out, c) / "result.json").exists())
            return
        ctx = get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            futs = [pool.submit(_run_cell_job, str(args.out), c, overrides, settings) for c in cells]
            for f in as_completed(futs):
                c, res, err = f.result()
                if res is not None:
                    results.append(res)
                else:
                    print(f"--- {c.task} {c.split} {c.name}: FAILED: {err}", flush=True)
                    failed.append(f"{c.task} {c.split} {c.name}: {err}")

    # phase 1: validation cells (learned arms x lrs x validation seeds)
    learned = [m for m in args.methods if m in LEARNED]
    val_cells = [Cell(t, m, s, "validation", lr) for t in args.tasks for m in learned for lr in args.lrs
                 for s in args.val_seeds]
    pool_run(val_cells)
    chosen: dict[tuple[str, str], float] = {}
    for task in args.tasks:
        choice = {}
        for m in learned:
            ch = choose_lr(results, task, m, args.lrs)
            if ch is not None:
                choice[m] = ch
                chosen[(task, m)] = ch["lr"]
        lr_file = args.out / task / "lr_choice.json"
        if choice and not args.report_only:
            old = json.loads(lr_file.read_text()) if lr_file.exists() else {}
            if any(old.get(m, {}).get("lr", ch["lr"]) != ch["lr"] for m, ch in choice.items()):
                raise SystemExit(f"{lr_file} records another lr choice than the validation cells give now: "
                                 "reported cells must keep the lr chosen before them; pass another --out")
            atomic_write_json(lr_file, {**old, **choice})
    # phase 2: reported cells (dice after its seed's dpo: the pool runs phase 2a, then dice)
    fixed = [m for m in args.methods if m not in LEARNED and m != "dice"]
    rep = [Cell(t, m, s, "test", None) for t in args.tasks for m in fixed for s in args.seeds]
    rep += [Cell(t, m, s, "test", chosen[(t, m)]) for t in args.tasks for m in learned for s in args.seeds
            if (t, m) in chosen]
    missing = [f"{t} {m}" for t in args.tasks for m in learned if (t, m) not in chosen]
    failed += [f"{x}: no lr chosen (validation cells missing or failed): its reported cells were not run" for x in missing]
    pool_run(rep)
    if "dice" in args.methods:
        pool_run([Cell(t, "dice", s, "test", None) for t in args.tasks for s in args.seeds])
    cells_all = val_cells + rep

    total = time.time() - t0
    cmd = "python bench/experiment.py " + " ".join(sys.argv[1:] if argv is None else [*argv, *overrides])
    header = (f"# Issue #23 experiment\n\ncommand: `{cmd}`\n\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, "
              f"{platform.platform()}; load average at end {tuple(round(x, 2) for x in os.getloadavg())}; "
              f"jobs {args.jobs}, train processes per cell {args.nproc}, threads per process {settings['threads']}, "
              f"global batch {args.global_batch}\n\n"
              f"setup seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + f"; total wall {total:.0f}s; "
              f"cells {len(results)} done of {len(cells_all) + (len(args.seeds) * len(args.tasks) if 'dice' in args.methods else 0)}\n")
    md = report(args.out, results, args.methods, args.tasks, failed, header)
    (args.out / "results.md").write_text(md)
    atomic_write_json(args.out / "results.json", {"runs": [{k: v for k, v in r.items() if k != "scores"} for r in results],
                                                  "failed": failed, "seconds": total})
    print("\n" + md)
    try:
        for f in plots(args.out, results, args.methods, args.tasks):
            print(f"plot: {f}")
    except ImportError as e:
        print(f"no plots ({e}); install matplotlib (the dev extra)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
