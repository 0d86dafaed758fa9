"""Model FLOPs of a training step, the numerator of MFU (pure: counts in, FLOPs out)."""

from __future__ import annotations


def train_flops(body_params: int, head_params: int, num_layers: int, hidden: int, tokens: float,
                logit_tokens: float, attention_context: float) -> float:
    """Model FLOPs of one forward+backward (3x the forward's; activation-checkpoint recompute is not model
    work and is not counted): 2 FLOPs per parameter per token through it, for the decoder body (every real
    token; the input embedding is a lookup, not counted) and the output head (only the positions whose
    logits the loss needs: DPO's response tokens), plus the attention score and value matmuls
    (2 x 2 x hidden per attended key, per layer; `attention_context` = sum over tokens of keys attended,
    PairBatch.attention_context). A tied head is the embedding matrix used as a real matmul: pass it here."""
    forward = 2.0 * body_params * tokens + 2.0 * head_params * logit_tokens
    forward += 4.0 * num_layers * hidden * attention_context
    return 3.0 * forward


def flop_params(model) -> tuple[int, int]:
    """(body, head) parameter counts of a causal LM for `train_flops` (ZeRO-3 partitioned parameters count
    in full): the body is everything but the input embedding (a lookup) and the output head; a head tied to
    the embedding is counted once, as the head."""
    def numel(p) -> int:
        return getattr(p, "ds_numel", p.numel())

    total = sum(numel(p) for p in model.parameters())  # a tied matrix appears once
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total - numel(emb) - (0 if head is emb else numel(head)), numel(head)
