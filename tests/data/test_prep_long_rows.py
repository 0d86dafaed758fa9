"""Over-long rows: tokenized from bounded windows (midpo/data/tokenization.py), with the same result as
tokenizing the whole texts and truncating, on both tokenizer families; memory bounded whatever one row holds."""

from __future__ import annotations

import collections
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from prep_helpers import all_rows, data_cfg, expected_ids, read_rejects, write_jsonl

from midpo.data.formats import RowReject, to_pair
from midpo.data.prepare import prepare
from midpo.data.tokenization import Encoded, EncodeSettings, PairEncoder, Rejected

REPO = Path(__file__).resolve().parents[2]
WORDS = ["sort", "reverse", "the", "apple", "naïve", "日本語", "😀", "x", "    ", "\n", "!!", "3.14", "zq", "def"]


def _text(rng: random.Random, n: int) -> str:
    parts, size = [], 0
    while size < n:
        w = rng.choice(WORDS) + (str(rng.randint(0, 999)) if rng.random() < 0.5 else "") + rng.choice([" ", "", "\n"])
        parts.append(w)
        size += len(w)
    return "".join(parts)[:n] or "w"


def _rows(n: int, seed: int) -> list[dict]:
    """Pairs whose texts are short or far past the window, on either side; some responses share a long start."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, chosen, other = (_text(rng, rng.choice([20, 400, 6000, 30000])) for _ in range(3))
        rejected = chosen[: len(chosen) // 2] + other if rng.random() < 0.3 else other
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def _outcome(result: Encoded | Rejected) -> tuple | str:
    if isinstance(result, Rejected):
        return result.reason
    return result.prompt_ids, result.chosen_ids, result.rejected_ids, result.prompt_truncated, result.responses_truncated


def _whole(enc: PairEncoder, row: dict) -> tuple | str:
    """The reference: tokenize the whole templated texts, then truncate (the path every short row takes)."""
    pair = to_pair(row, "standard", "f", 1)
    p = enc.render(pair.prompt_messages, True)
    fc, fr = (enc.render(pair.prompt_messages + side, False) for side in (pair.chosen_messages, pair.rejected_messages))
    try:
        return _outcome(enc._finish(pair, *enc.encode_texts([p, fc, fr])))
    except RowReject as e:
        return e.reason


@pytest.mark.parametrize("overflow", [("truncate", "truncate"), ("drop", "drop")])
@pytest.mark.parametrize("which", ["sentencepiece", "byte_level_bpe"])
def test_windows_equal_whole_tokenization(tok_dir, bbpe_dir, monkeypatch, which, overflow):
    """40 pairs with texts up to 30k characters (words, digits, accents, CJK, emoji, newlines, space runs): the
    windowed encoding equals tokenizing the whole texts and truncating, kept ids and reject reasons alike."""
    enc = PairEncoder(str(tok_dir if which == "sentencepiece" else bbpe_dir), EncodeSettings(48, 96, *overflow, None))
    windowed = []
    real = PairEncoder._encode_windowed
    monkeypatch.setattr(PairEncoder, "_encode_windowed", lambda self, pair, *a: windowed.append(pair) or real(self, pair, *a))
    rows = _rows(40, seed=1)
    got = enc.process("f", "standard", list(enumerate(rows, start=1)))
    assert len(windowed) > 20  # most rows took the windowed path
    outcomes = [_outcome(res) for res in got]
    assert outcomes == [_whole(enc, row) for row in rows]
    counts = collections.Counter(o if isinstance(o, str) else "kept" for o in outcomes)
    if overflow[0] == "truncate":  # most rows kept and compared id for id; shared-start pairs rejected
        assert counts["kept"] >= 20 and counts["identical_after_truncation"] >= 5, counts
    else:
        assert counts["prompt_too_long"] >= 10 and counts["response_too_long"] >= 5, counts


def test_long_prompt_keeps_its_end_and_bos_independently_checked(tmp_path, tok_dir, sp):
    """Against sentencepiece itself (not transformers): a 200k-character prompt keeps BOS + its last tokens."""
    rng = random.Random(2)
    prompt = "sort: " + " ".join(str(rng.randint(0, 99)) for _ in range(70_000))
    answer = " ".join(str(rng.randint(0, 9)) for _ in range(40_000))
    f = write_jsonl(tmp_path / "long.jsonl", [{"prompt": prompt, "chosen": answer, "rejected": "0 1"}])
    m = prepare(data_cfg(max_prompt_tokens=40, max_length=60, response_overflow="truncate"), [str(f)], tok_dir,
                tmp_path / "out")
    full_p, full_c = expected_ids(sp, prompt, answer)
    (row,) = all_rows(tmp_path / "out")
    assert row["prompt_ids"] == [sp.bos_id()] + full_p[-39:]
    assert row["chosen_ids"] == full_c[:20]
    assert m["truncation"]["prompts_truncated"] == 1 and m["longest_pair_tokens"] == 60


def test_a_text_no_window_can_settle_is_rejected_not_guessed(tmp_path, bbpe_dir):
    """A 200k-character run of one letter: its BPE tokens depend on where the run starts, so no window short of
    the whole text gives the right tail. The row is rejected with its own reason; shorter rows are kept."""
    rows = [{"prompt": "sort: " + "a" * 200_000, "chosen": "1", "rejected": "2"},
            {"prompt": "sort: " + "a" * 300, "chosen": "1", "rejected": "2"}]
    f = write_jsonl(tmp_path / "runs.jsonl", rows)
    m = prepare(data_cfg(max_prompt_tokens=48, max_length=96), [str(f)], bbpe_dir, tmp_path / "out")
    assert [(r["row"], r["reason"]) for r in read_rejects(tmp_path / "out")] == [(1, "truncation_unstable")]
    assert m["rejects"]["by_reason"] == {"truncation_unstable": 1} and m["rows"]["kept"] == 1


def test_the_tokenizer_never_sees_a_text_longer_than_the_window(tmp_path, tok_dir, monkeypatch):
    """A 20 MB prompt: every call into the tokenizer gets a bounded text (it used to get all 20 MB: ~9 GB)."""
    longest = []
    real = PairEncoder.encode_texts

    def bounded(self, texts):
        longest.append(max(map(len, texts), default=0))
        assert longest[-1] <= 2 * sum(self.window_chars()), "the whole text went to the tokenizer"
        return real(self, texts)

    monkeypatch.setattr(PairEncoder, "encode_texts", bounded)
    prompt = "sort: " + "1 2 3 4 5 6 7 8 9 " * 1_200_000
    f = write_jsonl(tmp_path / "big.jsonl", [{"prompt": prompt, "chosen": "1 2", "rejected": "2 1"}])
    m = prepare(data_cfg(), [str(f)], tok_dir, tmp_path / "out")
    assert m["rows"]["kept"] == 1 and m["truncation"]["prompts_truncated"] == 1
    assert len(prompt) > 20_000_000 and max(longest) < 100_000


RSS_SCRIPT = """
import json, resource, sys
from transformers import AutoTokenizer
from midpo.data.prepare import prepare
from midpo.config import DataConfig
cfg = DataConfig(eval_fraction=0.0, max_reject_fraction=1.0)
AutoTokenizer.from_pretrained(sys.argv[2])  # imports and one tokenizer load before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# a cap on address space, so the old behaviour (~9 GiB) fails fast instead of filling a shared machine
vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), resource.RLIM_INFINITY))
m = prepare(cfg, [sys.argv[1]], sys.argv[2], sys.argv[3])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"kept": m["rows"]["kept"], "delta_mib": (after - before) / 1024}))
"""


def test_peak_memory_of_a_20_mb_prompt_is_bounded(tmp_path, tok_dir):
    """Measured in a subprocess: prep of one 20 MB prompt grows peak RSS by under 1 GiB (the row itself and
    its rendered texts, ~150 MiB; tokenizing it whole took ~9 GiB)."""
    prompt = "sort: " + "12 7 33 4 5 61 0 9 " * 1_100_000
    f = write_jsonl(tmp_path / "big.jsonl", [{"prompt": prompt, "chosen": "1 2", "rejected": "2 1"}])
    env = {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(f), str(tok_dir), str(tmp_path / "out")], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kept"] == 1 and result["delta_mib"] < 1024, result
