"""One round's generation and labelling (`midpo iterate`'s first step), data-parallel like `midpo ref`.

    python -m midpo.demo.rollout --config <run_dir>/rounds/r2/recipe.yaml [--nproc N]
    torchrun --nproc_per_node N -m midpo.demo.rollout --config <run_dir>/rounds/r2/recipe.yaml

The round's recipe (written by `midpo iterate`) names the policy that answers (`model.policy`), the prompts
(`iterate.prompts`) and, for the implicit reward, pi_{t-1} (`iterate.implicit_reference`). Prompts are cut into
chunks of `iterate.chunk_prompts`; every rank answers its share of a chunk (`iterate.samples` answers per
prompt, batched HF `generate`), labels them, and rank 0 writes the chunk atomically under
`<run_dir>/rollout/.work/`: a killed run resumes at the first missing chunk. Generation is local to each rank,
so the ranks meet once per chunk (the gather): lockstep without a collective inside `generate`. Each sample is
seeded by (seed, round folder, prompt index, sample number) (`demo.sampling`: no draw depends on the batch), so
1 or N processes, and a resumed run, write the same samples as an uninterrupted one.

Labels (`iterate.labeller`): every sample is encoded as prep encodes a response (`PairEncoder.encode_answer`:
template, EOS); `implicit_reward` scores beta * (log pi_t(y|x) - log pi_{t-1}(y|x)) with the reference stage's
forward (`stages.ref.score_reference_rows`, the trainer's log-probs); `checker` the task's checker (1/0);
`reward_model` the first logit of a local sequence-classification model. Every labeller records the implicit
reward too (its chosen vs rejected statistics), when the round names pi_{t-1}. Empty answers and answers that do
not fit `data.max_length` get no score (prep would refuse them as pairs). Output: `<run_dir>/rollout/
samples.jsonl` (one line per prompt: its samples with text, length, score and log-probs) and `manifest.json`
(written last, keyed by everything the samples depend on).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from midpo.config import Config
from midpo.runtime import dist as pdist
from midpo.runtime.files import atomic_write_json, atomic_write_text
from midpo.runtime.fingerprint import hash_file, hash_json

log = logging.getLogger(__name__)

WORK = ".work"
MANIFEST = "manifest.json"
SAMPLES = "samples.jsonl"
TASK_FIELDS = ("task", "kind", "items")


def rollout_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir) / "rollout"


def implicit_beta(cfg: Config) -> float:
    return cfg.iterate.beta if cfg.iterate.beta is not None else (cfg.loss.beta if cfg.loss.beta is not None else 0.1)


def rollout_key(cfg: Config) -> dict:
    """Everything the samples depend on (a change discards partial chunks and a finished output)."""
    from midpo.runtime.models import model_fingerprint

    it = cfg.iterate
    key = {"policy": model_fingerprint(cfg.model.policy), "prompts": hash_file(it.prompts), "seed": cfg.seed,
           "round": Path(cfg.run_dir).name, "labeller": it.labeller,
           "sampling": [it.samples, it.temperature, it.max_new_tokens, it.batch_size, it.chunk_prompts],
           "data": [cfg.data.max_length, cfg.data.system_prompt], "dtype": cfg.model.dtype}
    if it.implicit_reference:  # every labeller records the implicit reward (DICE's labels; others' statistics)
        key["reference"] = model_fingerprint(it.implicit_reference)
        key["beta"] = implicit_beta(cfg)
    if it.labeller == "reward_model":
        key["reward_model"] = model_fingerprint(it.reward_model)
    return key


class Labeller:
    """Scores one rank's samples: `score(records, answers) -> per prompt, per sample dict`."""

    def __init__(self, cfg: Config, policy, tokenizer_dir: Path):
        from midpo.data.tokenization import EncodeSettings, PairEncoder

        d = cfg.data
        self.cfg, self.policy = cfg, policy
        self.encoder = PairEncoder(str(tokenizer_dir), EncodeSettings(d.max_prompt_tokens, d.max_length,
                                                                      d.prompt_overflow, d.response_overflow,
                                                                      d.system_prompt))
        self.reference = self.reward_model = None
        it = cfg.iterate
        if it.labeller == "implicit_reward" and not it.implicit_reference:
            raise ValueError("iterate.implicit_reference is not set (midpo iterate writes it per round)")
        if it.implicit_reference:
            from midpo.runtime.models import load_model

            self.reference = load_model(it.implicit_reference, cfg.model, device=pdist.device())
        if it.labeller == "reward_model":
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            self.rm_tok = AutoTokenizer.from_pretrained(it.reward_model)
            self.reward_model = AutoModelForSequenceClassification.from_pretrained(it.reward_model).eval()

    def score(self, records: list[dict], answers: list[list[str]]) -> list[list[dict]]:
        out: list[list[dict]] = []
        flat: list[tuple[int, int, list[int], list[int]]] = []  # (prompt, sample, prompt ids, response ids)
        for i, (rec, samples) in enumerate(zip(records, answers, strict=True)):
            row = []
            for j, text in enumerate(samples):
                enc = self.encoder.encode_answer(rec["prompt"], text)
                s: dict = {"text": text}
                if enc is None:
                    s["skip"] = "empty"
                elif len(enc[0]) + len(enc[1]) > self.cfg.data.max_length:
                    s["skip"] = "too_long"
                else:
                    s["length"] = len(enc[1])
                    flat.append((i, j, enc[0], enc[1]))
                row.append(s)
            out.append(row)
        lab = self.cfg.iterate.labeller
        if self.reference is not None:
            from midpo.core.selection import implicit_rewards

            pol = self._logps(self.policy, flat)
            ref = self._logps(self.reference, flat)
            implicit = implicit_rewards(pol, ref, implicit_beta(self.cfg))
            for (i, j, _, _), p, r, sc in zip(flat, pol, ref, implicit, strict=True):
                out[i][j].update(logp=p, ref_logp=r, implicit=sc)
                if lab == "implicit_reward":
                    out[i][j]["score"] = sc
        if lab == "checker":
            from midpo.demo.task import check_answer

            for i, j, _, _ in flat:
                out[i][j]["score"] = float(check_answer(records[i], out[i][j]["text"]))
        elif lab == "reward_model":
            for (i, j, _, _), sc in zip(flat, self._reward_model(records, out, flat), strict=True):
                out[i][j]["score"] = sc
        return out

    def _logps(self, model, flat, rows_per_batch: int = 16) -> list[float]:
        """Sequence log-prob sums of each sample, two samples per row through the reference stage's forward."""
        from midpo.runtime.models import pad_id_of
        from midpo.stages.ref import score_reference_rows

        sums: list[float] = []
        for b in range(0, len(flat), 2 * rows_per_batch):
            part = flat[b: b + 2 * rows_per_batch]
            rows = self._pair_rows(part)  # two samples of one prompt per row; an odd one out paired with itself
            recs = score_reference_rows(model, [r[0] for r in rows], packing=False, pad_id=pad_id_of(model))
            for (_, two), rec in zip(rows, recs, strict=True):
                sums.append(rec["chosen_ref_logp_sum"])
                if two:
                    sums.append(rec["rejected_ref_logp_sum"])
        return sums

    @staticmethod
    def _pair_rows(part) -> list[tuple[dict, bool]]:
        rows, k = [], 0
        while k < len(part):
            a = part[k]
            two = k + 1 < len(part) and part[k + 1][2] == a[2]
            z = part[k + 1] if two else a
            rows.append(({"id": str(k), "prompt_ids": a[2], "chosen_ids": a[3], "rejected_ids": z[3]}, two))
            k += 2 if two else 1
        return rows

    @torch.no_grad()
    def _reward_model(self, records, out, flat) -> list[float]:
        scores: list[float] = []
        for b in range(0, len(flat), 16):
            texts = [self.rm_tok.apply_chat_template(
                [{"role": "user", "content": records[i]["prompt"]}, {"role": "assistant", "content": out[i][j]["text"]}],
                tokenize=False) for i, j, _, _ in flat[b: b + 16]]
            if self.rm_tok.pad_token is None:
                self.rm_tok.pad_token = self.rm_tok.eos_token
            enc = self.rm_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            scores.extend(self.reward_model(**enc).logits[:, 0].float().tolist())
        return scores


def _chunk_path(work: Path, c: int, n: int) -> Path:
    return work / f"chunk-{c:05d}-of-{n:05d}.jsonl"


def read_records(path: str | Path) -> list[dict]:
    from midpo.errors import UnusableInputError

    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UnusableInputError(f"{path}: row {n}: not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise UnusableInputError(f"{path}: row {n}: no `prompt` string")
            rows.append(row)
    if not rows:
        raise UnusableInputError(f"{path}: no prompts")
    return rows


def main(cfg: Config, on_chunk: Callable[[int], None] | None = None) -> dict:
    """Generate and label every missing chunk, then (rank 0) merge them; returns the manifest."""
    from midpo.demo.evaluate import generate_answers
    from midpo.demo.sampling import row_seed
    from midpo.runtime.models import load_model, load_tokenizer

    pdist.init_distributed()
    rank, world = pdist.rank(), pdist.world_size()
    out = rollout_dir(cfg)
    work = out / WORK
    key = rollout_key(cfg)
    fp = hash_json(key)
    done = None
    if rank == 0:
        m = out / MANIFEST
        if m.exists() and (out / SAMPLES).exists() and json.loads(m.read_text()).get("fingerprint") == fp:
            done = json.loads(m.read_text())
        else:
            m.unlink(missing_ok=True)
            plan = work / "plan.json"
            if work.exists() and (not plan.exists() or json.loads(plan.read_text()).get("fingerprint") != fp):
                log.warning("rollout: discarding partial chunks in %s (built for other settings)", work)
                shutil.rmtree(work)
            if not plan.exists():
                atomic_write_json(plan, {"fingerprint": fp, "key": key})
    done = pdist.broadcast_object(done)
    if done is not None:
        pdist.print0(f"rollout: {out / MANIFEST} is complete for these settings; nothing to do")
        return done
    it = cfg.iterate
    records = read_records(it.prompts)
    if it.labeller == "checker":
        bad = [n for n, r in enumerate(records) if not all(k in r for k in TASK_FIELDS)]
        if bad:
            from midpo.errors import UnusableInputError

            raise UnusableInputError(f"{it.prompts}: row {bad[0] + 1} has no task record ({', '.join(TASK_FIELDS)}): "
                                     "the checker labeller needs a verifiable task")
    n_chunks = (len(records) + it.chunk_prompts - 1) // it.chunk_prompts
    pending = [c for c in range(n_chunks) if not _chunk_path(work, c, n_chunks).exists()] if rank == 0 else None
    pending = pdist.broadcast_object(pending)
    if len(pending) < n_chunks:
        pdist.print0(f"rollout: resuming, {n_chunks - len(pending)}/{n_chunks} chunks already done")
    policy = load_model(cfg.model.policy, cfg.model, device=pdist.device())
    tok = load_tokenizer(cfg.model.policy)
    labeller = Labeller(cfg, policy, Path(cfg.data.tokenizer or cfg.model.policy))
    written = 0
    for c in pending:
        mine = list(range(c * it.chunk_prompts, min((c + 1) * it.chunk_prompts, len(records))))[rank::world]
        recs = [records[i] for i in mine]
        answers: list[list[str]] = [[] for _ in recs]
        if recs:
            flat_prompts = [r["prompt"] for r in recs for _ in range(it.samples)]
            seeds = [row_seed(cfg.seed, key["round"], i, k) for i in mine for k in range(it.samples)]
            texts = generate_answers(policy, tok, flat_prompts, max_new_tokens=it.max_new_tokens,
                                     batch_size=it.batch_size * it.samples, do_sample=True,
                                     temperature=it.temperature, row_seeds=seeds)
            answers = [texts[k * it.samples:(k + 1) * it.samples] for k in range(len(recs))]
        scored = labeller.score(recs, answers) if recs else []
        mine_rows = [{"index": i, "prompt": r["prompt"], "record": {k: r[k] for k in TASK_FIELDS if k in r},
                      "samples": s} for i, r, s in zip(mine, recs, scored, strict=True)]
        gathered = pdist.gather_objects(mine_rows)
        if rank == 0:
            rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
            atomic_write_text(_chunk_path(work, c, n_chunks), "".join(json.dumps(r) + "\n" for r in rows))
            written += 1
            if on_chunk is not None:
                on_chunk(written)
    pdist.barrier()
    manifest: dict = {}
    if rank == 0:
        lines = [_chunk_path(work, c, n_chunks).read_text() for c in range(n_chunks)]
        atomic_write_text(out / SAMPLES, "".join(lines))
        n_samples = sum(len(json.loads(x)["samples"]) for part in lines for x in part.splitlines())
        manifest = {"fingerprint": fp, "key": key, "prompts": len(records), "samples": n_samples, "chunks": n_chunks}
        atomic_write_json(out / MANIFEST, manifest)  # last: marks the samples complete
        shutil.rmtree(work, ignore_errors=True)
        pdist.print0(f"rollout: {len(records)} prompts x {it.samples} samples -> {out / SAMPLES}")
    pdist.barrier()
    return pdist.broadcast_object(manifest)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a round's recipe (<run_dir>/rounds/r<k>/recipe.yaml)")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (N>1 spawns torchrun)")


def run(args) -> int:
    from midpo.runtime.launch import run_or_spawn

    def here(cfg: Config) -> None:
        if cfg.sft.num_threads > 0:
            torch.set_num_threads(cfg.sft.num_threads)
        try:
            main(cfg)
        finally:
            pdist.cleanup()

    return run_or_spawn(args, "midpo.demo.rollout", here)


if __name__ == "__main__":
    from midpo.runtime.launch import stage_cli

    sys.exit(stage_cli("rollout", add_arguments, run))
