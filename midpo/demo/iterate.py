"""`midpo iterate`: rounds of on-policy preference training -- DICE, or iterative DPO with another labeller.

    midpo iterate --config RECIPE --rounds N [--nproc P] [key.sub=value ...]

Round k (1..N) lives in `<run_dir>/rounds/r<k>/`, itself a run folder (its own `recipe.yaml` and `config.yaml`):
1. rollout: the current policy pi_{k-1} answers the round's prompts `iterate.samples` times; the labeller scores
   every answer (`midpo.demo.rollout`, P processes, resumable by chunk);
2. selection: per prompt best vs worst by the length-regularized score (`midpo.core.selection`), ties and gaps
   under `iterate.min_margin` dropped (counted by reason), plus offline pairs at `iterate.replay_fraction`
   -> `pairs.jsonl`, `selection.json`;
3. prep -> ref (the cache of pi_{k-1}: the previous round's policy is this round's reference, as DICE's prior
   needs) -> train (starting from pi_{k-1}) -> export = pi_k, the next round's policy and reference.
Round 1's policy is the run's own (`iterate.start`: its initial policy, or its DPO export); its implicit reward
divides by the run's reference. Every step is skipped when its output's fingerprint matches (prep, ref, train
and the rollout resume where a kill left them); `round.json`, written last, marks a round done, keyed by its
settings and input models: a finished round is never redone, and one finished with other settings is refused.
Per round: TensorBoard scalars (`<run_dir>/tensorboard/iterate`), `<run_dir>/rounds/summary.json` and a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

from midpo.config import Config, load_config, to_dict
from midpo.core import selection as sel
from midpo.errors import MidpoError, UnusableInputError
from midpo.runtime.files import atomic_write_json, atomic_write_text, save_config
from midpo.runtime.fingerprint import hash_json
from midpo.runtime.layout import RunLayout

log = logging.getLogger(__name__)

ROUND_RECORD = "round.json"
# keys that do not change what a round computes (its length, where the run lives, the per-round eval)
UNKEYED = ("run_dir", "iterate.rounds", "iterate.eval_prompts", "iterate.implicit_reference")


class IterateError(MidpoError, RuntimeError):
    """A round that cannot run or continue as asked; the message says why and what to do."""


def round_dir(cfg: Config, k: int) -> Path:
    return Path(cfg.run_dir) / "rounds" / f"r{k}"


def _stage(module: str, rcfg: Config, recipe: Path, nproc: int, **hooks) -> None:
    """One stage of a round: with one process its `main` runs here, in this process's process group (a child per
    stage would pay the DeepSpeed import and group start-up each time: most of a tiny round's time); with more,
    `python -m MODULE --config RECIPE --nproc N` as a child, as a user would run it. `hooks`: the stage's test seams
    (rollout's on_chunk, train's callbacks), in this process only."""
    if nproc > 1:
        _launch(module, recipe, nproc)
        return
    import importlib

    importlib.import_module(module).main(rcfg, **hooks)


def _launch(module: str, recipe: Path, nproc: int) -> None:
    """`python -m MODULE --config RECIPE --nproc N` as a child, as a user would run it (demo.run's environment)."""
    from midpo.demo.run import _LAUNCHER_VARS

    cmd = [sys.executable, "-m", module, "--config", str(recipe), "--nproc", str(nproc)]
    log.info("running %s", " ".join(cmd))
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")}
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise SystemExit(f"midpo iterate: `{' '.join(cmd)}` failed with exit code {rc}")


# ---------------------------------------------------------------------------------------------
# round 0: the models round 1 starts from


def start_models(cfg: Config, nproc: int) -> tuple[Path, Path]:
    """(pi_0, its reference): the run's initial policy and reference, or (`iterate.start=export`) its DPO export
    and reference. Builds what is missing with the stages of `midpo run` (each skipped when up to date; an
    existing export is taken as it is)."""
    from midpo.demo.run import _launch as launch_cli
    from midpo.demo.run import prepare_base

    layout = RunLayout.resolve(cfg)
    if cfg.iterate.start == "export":
        if (layout.export / "config.json").is_file():
            return layout.export, layout.reference  # exported: the base run's stages are done (relaunching its
            # training on another process count would be refused as a resume with another global batch)
        prepare_base(cfg, nproc, {})
        launch_cli("train", layout.config, nproc)
        return layout.export, layout.reference
    from midpo.data.prepare import prepare
    from midpo.demo.sft import train_sft
    from midpo.demo.synthetic import build_tiny_default
    from midpo.runtime.layout import claim_run

    claim_run(cfg)
    if not cfg.model.policy or (cfg.sft.steps > 0 and not cfg.data.inputs):  # the embedded default is needed
        build_tiny_default(layout.synth, cfg.synth)
    if cfg.sft.steps > 0:
        prepare(cfg.data, cfg.data.inputs or layout.default_inputs, layout.tokenizer, layout.sft_data)
        train_sft(cfg, layout.sft_data, layout.init_model, layout.sft)
    return layout.policy, layout.reference


def prompts_file(cfg: Config) -> Path:
    layout = RunLayout.resolve(cfg)
    return Path(cfg.iterate.prompts or cfg.onpolicy.prompts or layout.synth / "onpolicy_prompts.jsonl")


def replay_inputs(cfg: Config) -> list[Path]:
    if cfg.iterate.replay_inputs:
        return [Path(p) for p in cfg.iterate.replay_inputs]
    layout = RunLayout.resolve(cfg)
    if cfg.onpolicy.enabled:
        return [layout.onpolicy / "pairs.jsonl"]
    return [Path(p) for p in (cfg.data.inputs or layout.default_inputs)]


def round_prompts(records: list[str], k: int, per_round: int) -> list[str]:
    """Round k's block of `per_round` prompt lines (wrapping around); all of them when per_round is 0."""
    if per_round <= 0 or per_round >= len(records):
        return list(records)
    start = ((k - 1) * per_round) % len(records)
    return [records[(start + i) % len(records)] for i in range(per_round)]


# ---------------------------------------------------------------------------------------------
# selection and replay (pure given the samples)


def select_pairs(rows: list[dict], alpha: float, min_margin: float) -> tuple[list[dict], dict]:
    """Best vs worst of each prompt's scored samples; (pairs, stats: counts by drop reason, means chosen vs
    rejected of score, implicit reward and length)."""
    pairs: list[dict] = []
    counts: Counter = Counter()
    sides: dict[str, list[float]] = {}
    for row in rows:
        scored = [s for s in row["samples"] if "score" in s]
        counts["samples"] += len(row["samples"])
        for s in row["samples"]:
            if "skip" in s:
                counts[f"samples_{s['skip']}"] += 1
        shaped = sel.length_regularized([s["score"] for s in scored], [s["length"] for s in scored], alpha)
        pick = sel.select_pair(shaped, min_margin)
        if isinstance(pick, str):
            counts[f"dropped_{pick}"] += 1
            continue
        c, r = scored[pick[0]], scored[pick[1]]
        for name, s in (("chosen", c), ("rejected", r)):
            for key in ("score", "implicit", "length", "logp", "ref_logp"):
                if key in s:
                    sides.setdefault(f"{name}/{key}", []).append(s[key])
        pairs.append({"prompt": row["prompt"], "chosen": c["text"], "rejected": r["text"], **row.get("record", {}),
                      "chosen_score": c["score"], "rejected_score": r["score"]})
    counts["prompts"] = len(rows)
    counts["pairs_onpolicy"] = len(pairs)
    stats = {"counts": dict(sorted(counts.items())), "means": {k: sel.mean(v) for k, v in sorted(sides.items())}}
    return pairs, stats


def read_replay(paths: list[Path]) -> list[dict]:
    """Offline pairs (standard JSONL rows: prompt, chosen, rejected strings) for replay."""
    rows = []
    for path in paths:
        if path.suffix != ".jsonl":
            raise UnusableInputError(f"{path}: replay reads JSONL files (prompt, chosen, rejected); set "
                                     "iterate.replay_inputs to one")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
                    raise UnusableInputError(f"{path}: row {n}: replay needs prompt, chosen and rejected strings")
                rows.append(row)
    return rows


def mix_replay(onpolicy: list[dict], offline: list[dict], fraction: float, seed: int) -> list[dict]:
    """On-policy pairs plus `replay_count` offline pairs drawn without replacement (seeded per round)."""
    n = sel.replay_count(len(onpolicy), fraction, len(offline))
    picked = random.Random(seed).sample(range(len(offline)), n) if n else []
    return onpolicy + [dict(offline[i], error_kind="replay") for i in sorted(picked)]


# ---------------------------------------------------------------------------------------------
# one round


def round_config(cfg: Config, k: int, policy: Path, implicit_reference: Path, prompts: Path) -> Config:
    """Round k's own recipe: its folder, pi_{k-1} as policy and reference, its pairs as data, no SFT."""
    base = RunLayout.resolve(cfg)
    d = round_dir(cfg, k)
    return dataclasses.replace(
        cfg, run_dir=str(d),
        model=dataclasses.replace(cfg.model, policy=str(policy), reference=str(policy)),
        data=dataclasses.replace(cfg.data, inputs=[str(d / "pairs.jsonl")], tokenizer=str(base.tokenizer)),
        sft=dataclasses.replace(cfg.sft, steps=0),
        onpolicy=dataclasses.replace(cfg.onpolicy, enabled=False),
        train=dataclasses.replace(cfg.train, export_at_end=True),
        # rounds and eval_prompts do not change a round's work: fixed here, so changing them between reruns never
        # refuses the resume of the round's training (its config must match its checkpoint's)
        iterate=dataclasses.replace(cfg.iterate, prompts=str(prompts), implicit_reference=str(implicit_reference),
                                    rounds=0, eval_prompts=0))


def round_key(cfg: Config, policy: Path, implicit_reference: Path) -> str:
    from midpo.config import flat_items
    from midpo.runtime.models import model_fingerprint

    settings = {k: v for k, v in flat_items(cfg).items() if k not in UNKEYED}
    return hash_json({"settings": settings, "policy": model_fingerprint(policy),
                      "implicit_reference": model_fingerprint(implicit_reference)})


def round_models(cfg: Config, k: int) -> tuple[Path, Path]:
    """(pi_{k-1}, pi_{k-2}) of round k: the policy that answers and trains, and the model its implicit reward
    divides by. Round 1: the start models; then the rounds' own exports (paths inside the run folder, so a moved
    or copied run keeps its rounds)."""
    layout = RunLayout.resolve(cfg)
    start = (layout.export if cfg.iterate.start == "export" else layout.policy), layout.reference
    chain = [start[1], start[0]] + [round_dir(cfg, j) / "export" for j in range(1, k)]
    return chain[k], chain[k - 1]


def finished_round(cfg: Config, k: int) -> dict | None:
    """Round k's record when it is done with these settings and input models; None when not done; refused
    (IterateError) when it was finished with others."""
    policy, implicit_reference = round_models(cfg, k)
    record_path = round_dir(cfg, k) / ROUND_RECORD
    if not record_path.exists():
        return None
    record = json.loads(record_path.read_text())
    if record.get("key") != round_key(cfg, policy, implicit_reference):
        raise IterateError(f"{record_path}: round {k} finished with other settings or input models than this "
                           "recipe's; a finished round is never redone: set another run_dir (or move "
                           f"{round_dir(cfg, 1).parent} away) to start the rounds over")
    return record


def setup_round(cfg: Config, k: int) -> tuple[Config, Path]:
    """Round k's prompts and recipe (rewritten only when they change) and its claimed layout; (config, recipe)."""
    from midpo.runtime.layout import claim_run

    policy, implicit_reference = round_models(cfg, k)
    d = round_dir(cfg, k)
    source = prompts_file(cfg)
    if not source.is_file():
        raise UnusableInputError(f"{source}: no prompts file (iterate.prompts, else onpolicy.prompts, else the embedded "
                                 "default's <run_dir>/synth/onpolicy_prompts.jsonl)")
    lines = [x for x in source.read_text(encoding="utf-8").splitlines() if x.strip()]
    prompts = d / "prompts.jsonl"
    text = "".join(x + "\n" for x in round_prompts(lines, k, cfg.iterate.prompts_per_round))
    if not prompts.exists() or prompts.read_text(encoding="utf-8") != text:
        atomic_write_text(prompts, text)
    rcfg = round_config(cfg, k, policy, implicit_reference, prompts)
    recipe = d / "recipe.yaml"
    save_config(rcfg, recipe)
    claim_run(rcfg)
    return rcfg, recipe


def select_round(cfg: Config, k: int, rcfg: Config) -> dict:
    """The rollout's samples -> pairs.jsonl (best vs worst + replay) and selection.json, then prep; the stats."""
    from midpo.data.prepare import prepare
    from midpo.demo.rollout import SAMPLES, rollout_dir

    d = round_dir(cfg, k)
    rows = [json.loads(x) for x in (rollout_dir(rcfg) / SAMPLES).read_text().splitlines() if x.strip()]
    it = cfg.iterate
    onpolicy, stats = select_pairs(rows, it.length_alpha, it.min_margin)
    if not onpolicy:
        raise IterateError(f"round {k}: no pairs from {len(rows)} prompts ({stats['counts']}): every prompt's samples "
                           "tied (raise iterate.temperature or samples; implicit_reward needs a policy that differs "
                           "from its reference: iterate.start=export)")
    offline = read_replay(replay_inputs(cfg)) if it.replay_fraction > 0 else []
    pairs = mix_replay(onpolicy, offline, it.replay_fraction, cfg.seed * 1000 + k)
    stats["counts"]["pairs_replay"] = len(pairs) - len(onpolicy)
    stats["counts"]["pairs"] = len(pairs)
    body = "".join(json.dumps(p) + "\n" for p in pairs)
    if not (d / "pairs.jsonl").exists() or (d / "pairs.jsonl").read_text(encoding="utf-8") != body:
        atomic_write_text(d / "pairs.jsonl", body)
    layout = RunLayout.resolve(rcfg)
    prep = prepare(rcfg.data, rcfg.data.inputs, layout.tokenizer, layout.data)
    stats["counts"]["prep_rejected"] = (prep.get("rows") or {}).get("rejected", 0)
    atomic_write_json(d / "selection.json", stats)
    print(f"--- round {k}: {stats['counts']}", flush=True)
    return stats


def finish_round(cfg: Config, k: int, rcfg: Config) -> dict:
    """round.json (written last: the round is done): fingerprints, selection stats, training metrics."""
    from midpo.demo.rollout import MANIFEST, rollout_dir
    from midpo.demo.run import _read_last_eval
    from midpo.runtime.models import model_fingerprint

    d = round_dir(cfg, k)
    policy, implicit_reference = round_models(cfg, k)
    layout = RunLayout.resolve(rcfg)
    metrics_file = layout.logs / "train_metrics.jsonl"
    lines = metrics_file.read_text().splitlines() if metrics_file.exists() else []
    last = json.loads(lines[-1]) if lines else {}
    record = {"key": round_key(cfg, policy, implicit_reference), "round": k, "policy": str(policy),
              "implicit_reference": str(implicit_reference), "export": str(layout.export),
              "reference": str(layout.reference), "reference_fingerprint": model_fingerprint(layout.reference),
              "export_fingerprint": model_fingerprint(layout.export),
              "rollout_fingerprint": json.loads((rollout_dir(rcfg) / MANIFEST).read_text())["fingerprint"],
              "selection": json.loads((d / "selection.json").read_text()),
              "train": {n: v for n, v in last.items() if isinstance(v, (int, float))}, "train_eval": _read_last_eval(d)}
    atomic_write_json(d / ROUND_RECORD, record)
    return record


def run_round(cfg: Config, k: int, nproc: int, hooks: dict | None = None) -> dict:
    """Round k end to end (each step skipped when up to date); returns its record (round.json). hooks: "on_chunk"
    (rollout) and "callbacks" (train), the test seams of tests/support/faults.py."""
    hooks = hooks or {}
    record = finished_round(cfg, k)
    if record is not None:
        print(f"=== midpo iterate: round {k} is done ({round_dir(cfg, k) / ROUND_RECORD}); not redone", flush=True)
        return record
    print(f"\n=== midpo iterate: round {k}: policy {round_models(cfg, k)[0]}", flush=True)
    rcfg, recipe = setup_round(cfg, k)
    _stage("midpo.demo.rollout", rcfg, recipe, nproc, **{n: hooks[n] for n in ("on_chunk",) if n in hooks})
    select_round(cfg, k, rcfg)
    _stage("midpo.stages.ref", rcfg, recipe, nproc)
    _stage("midpo.stages.train", rcfg, recipe, nproc, **{n: hooks[n] for n in ("callbacks",) if n in hooks})
    return finish_round(cfg, k, rcfg)


# ---------------------------------------------------------------------------------------------
# per-round accuracy, metrics, the table


def evaluate_round(cfg: Config, k: int, model: Path) -> dict | None:
    """Greedy task accuracy of `model` on the run's held-out prompts (cached beside the round, by model)."""
    from midpo.demo.evaluate import evaluate_model
    from midpo.runtime.models import model_fingerprint

    prompts = RunLayout.resolve(cfg).synth / "eval_prompts.jsonl"
    if cfg.iterate.eval_prompts <= 0 or not prompts.exists():
        return None
    path = Path(cfg.run_dir) / "rounds" / f"eval-r{k}.json"
    key = hash_json({"model": model_fingerprint(model), "n": cfg.iterate.eval_prompts})
    if path.exists() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())
    res = evaluate_model(model, prompts, n=cfg.iterate.eval_prompts, sampled=False, seed=cfg.seed)
    out = {"key": key, "model": str(model), "n": res["n"], "greedy/accuracy": res["greedy/accuracy"],
           "greedy/ci95": res["greedy/ci95"], "greedy/scores": res["greedy/scores"]}
    atomic_write_json(path, out)
    return out


def round_row(k: int, record: dict | None, ev: dict | None, ev0: dict | None) -> dict:
    from midpo.demo.evaluate import paired_difference

    row: dict = {"round": k}
    if record:
        c, m = record["selection"]["counts"], record["selection"]["means"]
        row.update({"pairs": c.get("pairs_onpolicy", 0), "replay": c.get("pairs_replay", 0),
                    "dropped": {x[len("dropped_"):]: v for x, v in c.items() if x.startswith("dropped_")},
                    **{f"{s}/{q}": m[f"{s}/{q}"] for s in ("chosen", "rejected") for q in ("score", "implicit", "length")
                       if f"{s}/{q}" in m}})
        for q in ("loss", "rewards/accuracies", "rewards/margins"):
            if q in record.get("train", {}):
                row[f"train/{q}"] = record["train"][q]
    if ev:
        row["greedy/accuracy"] = ev["greedy/accuracy"]
        if ev0 and k > 0:
            row["paired_vs_r0"] = paired_difference(ev0["greedy/scores"], ev["greedy/scores"])
    return row


def log_tensorboard(cfg: Config, row: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(Path(cfg.run_dir) / "tensorboard" / "iterate")) as w:
        for name, v in row.items():
            if isinstance(v, (int, float)) and name != "round":
                w.add_scalar(f"iterate/{name}", v, row["round"])
        for reason, v in (row.get("dropped") or {}).items():
            w.add_scalar(f"iterate/dropped_{reason}", v, row["round"])
        if "paired_vs_r0" in row:
            w.add_scalar("iterate/greedy_gain_vs_r0", row["paired_vs_r0"]["diff"], row["round"])


def format_rounds(rows: list[dict]) -> str:
    head = ["round", "pairs", "replay", "dropped", "score c/r", "implicit c/r", "len c/r", "train loss", "greedy acc", "vs r0 (paired 95%)"]
    table = [head]
    for r in rows:
        d = r.get("paired_vs_r0")
        table.append([
            str(r["round"]), str(r.get("pairs", "-")), str(r.get("replay", "-")),
            ",".join(f"{k}:{v}" for k, v in (r.get("dropped") or {}).items()) or "-",
            f"{r['chosen/score']:.3f}/{r['rejected/score']:.3f}" if "chosen/score" in r else "-",
            f"{r['chosen/implicit']:.3f}/{r['rejected/implicit']:.3f}" if "chosen/implicit" in r else "-",
            f"{r['chosen/length']:.1f}/{r['rejected/length']:.1f}" if "chosen/length" in r else "-",
            f"{r['train/loss']:.4f}" if "train/loss" in r else "-",
            f"{r['greedy/accuracy']:.3f}" if "greedy/accuracy" in r else "-",
            f"{d['diff']:+.3f} [{d['lower']:+.3f}, {d['upper']:+.3f}]" if d else "-"])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line, "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |", line]
    out += ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in table[1:]]
    return "\n".join(out + [line])


def report_round(cfg: Config, k: int, record: dict, ev0: dict | None) -> dict:
    """Round k's accuracy (when iterate.eval_prompts > 0), its table row, its TensorBoard scalars."""
    ev = evaluate_round(cfg, k, round_dir(cfg, k) / "export")
    row = round_row(k, record, ev, ev0)
    log_tensorboard(cfg, row)
    return row


def iterate(cfg: Config, rounds: int, nproc: int = 1, hooks: dict[int, dict] | None = None) -> list[dict]:
    """Rounds 1..`rounds`; returns the per-round rows (round 0: the start model). hooks: round -> run_round's."""
    if cfg.sft.num_threads > 0:
        import torch

        torch.set_num_threads(cfg.sft.num_threads)
    policy, reference = start_models(cfg, nproc)
    if nproc == 1:
        from midpo.runtime import dist as pdist

        pdist.init_distributed()  # one process group for every round's stages (see _stage)
    if cfg.iterate.labeller == "implicit_reward":
        from midpo.runtime.models import model_fingerprint

        if model_fingerprint(policy) == model_fingerprint(reference):
            raise IterateError(f"iterate.labeller=implicit_reward: round 1's policy {policy} equals its reference "
                               f"{reference}, so every implicit reward is 0; start from a DPO model "
                               "(iterate.start=export, or model.policy/model.reference of a DPO run)")
    ev0 = evaluate_round(cfg, 0, policy)
    rows = [round_row(0, None, ev0, None)]
    for k in range(1, rounds + 1):
        record = run_round(cfg, k, nproc, (hooks or {}).get(k))
        rows.append(report_round(cfg, k, record, ev0))
    atomic_write_json(Path(cfg.run_dir) / "rounds" / "summary.json",
                      {"labeller": cfg.iterate.labeller, "start": cfg.iterate.start, "rows": rows,
                       "config": to_dict(cfg.iterate)})
    print(f"\nmidpo iterate summary ({cfg.run_dir}, labeller={cfg.iterate.labeller}, start={cfg.iterate.start})")
    print(format_rounds(rows), flush=True)
    return rows


def run_step(cfg: Config, k: int, step: str) -> Path | None:
    """One step of round k in this process, for schedulers that run a round's stages as separate jobs
    (slurm/round.sbatch): setup (round 1 also builds the start models) and select print the round's recipe,
    which the rollout, ref and train stages then read; finish writes round.json and the round's report. A
    finished round skips every step."""
    if step == "setup" and k == 1:
        start_models(cfg, 1)
    recipe = round_dir(cfg, k) / "recipe.yaml"
    done = finished_round(cfg, k)
    if step == "recipe" or done is not None:
        if not recipe.exists():
            raise IterateError(f"{recipe} does not exist: run round {k}'s setup step first")
        return recipe
    rcfg, recipe = setup_round(cfg, k)
    if step == "select":
        select_round(cfg, k, rcfg)
    elif step == "finish":
        record = finish_round(cfg, k, rcfg)
        report_round(cfg, k, record, evaluate_round(cfg, 0, round_models(cfg, 1)[0]))
    return recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="recipe YAML or a name in recipes/ (default: tiny)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds to run (default: iterate.rounds)")
    parser.add_argument("--nproc", type=int, default=1, help="processes for rollout, ref and train (default 1)")
    parser.add_argument("--round", type=int, default=None,
                        help="with --step: one step of this round only (slurm/round.sbatch runs a round as jobs)")
    parser.add_argument("--step", choices=("setup", "select", "finish", "recipe"), default=None,
                        help="setup: prompts + recipe (round 1: the start models too); select: pairs + prep; finish: "
                        "round.json + report; recipe: print the round's recipe path. Each prints it last.")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if (args.round is None) != (args.step is None):
        raise IterateError("--round and --step go together (one step of one round)")
    if args.step is not None:
        if args.round < 1:
            raise IterateError(f"--round must be >= 1, got {args.round}")
        print(run_step(cfg, args.round, args.step), flush=True)  # last line: the recipe the next stage reads
        return 0
    iterate(cfg, args.rounds if args.rounds is not None else cfg.iterate.rounds, nproc=args.nproc)
    return 0
