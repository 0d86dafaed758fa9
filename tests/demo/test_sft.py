"""The SFT warm start's helpers: warmup + cosine schedule, token-mean NLL on response tokens only; its
up-to-date check (data hashes) and --force."""

from __future__ import annotations

import pytest
import torch
from train_helpers import flip_two_bytes, make_model, make_rows, write_data

from midpo.demo.sft import _lr_at, collate_sft, sft_loss


def test_lr_warms_up_then_decays_to_zero() -> None:
    assert _lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert _lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert _lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert _lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert _lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)


class _Oracle(torch.nn.Module):
    """Puts all mass on the next token of a fixed sequence: NLL ~ 0 wherever labels are scored."""

    def __init__(self, seq: list[int], vocab: int = 16) -> None:
        super().__init__()
        self.seq, self.vocab = seq, vocab

    def forward(self, input_ids, attention_mask):
        b, t = input_ids.shape
        logits = torch.full((b, t, self.vocab), -1e4)
        for i in range(t - 1):
            logits[:, i, self.seq[i + 1]] = 1e4
        return type("Out", (), {"logits": logits})()


def test_sft_loss_scores_only_response_tokens() -> None:
    row = {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2]}
    ids, attn, labels = collate_sft([row], pad_id=3)
    assert sft_loss(_Oracle([1, 5, 6, 7, 2]), ids, attn, labels).item() == pytest.approx(0.0, abs=1e-3)
    # wrong only on the prompt: still ~0 (prompt masked); wrong on a response token: large
    assert sft_loss(_Oracle([1, 9, 9, 7, 2]), ids, attn, labels).item() == pytest.approx(0.0, abs=1e-3)
    assert sft_loss(_Oracle([1, 5, 6, 9, 2]), ids, attn, labels).item() > 100


def test_sft_refuses_damaged_data_even_when_up_to_date_and_force_retrains(tmp_path) -> None:
    """The up-to-date check covers the data input (hashes re-checked: damaged data is refused, naming the
    file and `midpo prep --force`); `midpo sft --force` retrains an up-to-date output."""
    from midpo import cli
    from midpo.config import load_config
    from midpo.demo.sft import MANIFEST, train_sft
    from midpo.runtime.prepared import DataDamaged

    model = make_model(tmp_path / "model", hidden=32, layers=1)
    data = write_data(tmp_path / "data", {"train": make_rows(8, 1), "eval": make_rows(2, 2)})
    overrides = [f"run_dir={tmp_path / 'run'}", "sft.steps=2", "sft.batch_size=4", "sft.warmup_steps=1",
                 "model.dtype=fp32", "model.attn_implementation=sdpa"]
    cfg, out = load_config(None, overrides), tmp_path / "sft"
    train_sft(cfg, data, model, out)
    stamp = (out / MANIFEST).stat().st_mtime_ns
    train_sft(cfg, data, model, out)  # up to date
    assert (out / MANIFEST).stat().st_mtime_ns == stamp
    argv = ["sft", "--data", str(data), "--init", str(model), "--out", str(out), *overrides]
    assert cli.main([*argv, "--force"]) == 0 and (out / MANIFEST).stat().st_mtime_ns != stamp
    shard = data / "train" / "data-00001-of-00002.arrow"
    flip_two_bytes(shard)
    with pytest.raises(DataDamaged) as e:
        train_sft(cfg, data, model, out)
    assert str(e.value) == (f"{shard}: content hash differs from {data / 'manifest.json'} (damaged or edited); "
                            "re-run `midpo prep --force`")
