"""Model FLOPs of a training step, the numerator of MFU (pure: counts in, FLOPs out)."""

from __future__ import annotations


def train_flops(body_params: int, head_params: int, num_layers: int, hidden: int, tokens: float,
                logit_tokens: float, attention_context: float, frozen_body: int = 0, frozen_head: int = 0) -> float:
    """Model FLOPs of one forward+backward (3x the forward's; activation-checkpoint recompute is not model
    work and is not counted): 2 FLOPs per parameter per token through it, for the decoder body (every real
    token; the input embedding is a lookup, not counted) and the output head (only the positions whose
    logits the loss needs: DPO's response tokens), plus the attention score and value matmuls
    (2 x 2 x hidden per attended key, per layer; `attention_context` = sum over tokens of keys attended,
    PairBatch.attention_context). A tied head is the embedding matrix used as a real matmul: pass it here.
    `frozen_body` / `frozen_head` (parts of body_params / head_params: LoRA's base weights) take no
    weight-gradient matmul, so they count 2x their forward (forward + input gradient), not 3x."""
    forward = 2.0 * body_params * tokens + 2.0 * head_params * logit_tokens
    forward += 4.0 * num_layers * hidden * attention_context
    return 3.0 * forward - 2.0 * frozen_body * tokens - 2.0 * frozen_head * logit_tokens


IDLE_COPY = "original_module"  # PEFT's modules_to_save keeps the frozen original beside the trained copy: unused


def _numel(p) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitioned parameters count in full


def flop_params(model) -> tuple[int, int]:
    """(body, head) parameter counts of a causal LM for `train_flops`: the body is everything but the input
    embedding (a lookup), the output head and PEFT's idle modules_to_save originals; a head tied to the
    embedding is counted once, as the head."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(_numel(p) for n, p in model.named_parameters() if IDLE_COPY not in n)  # a tied matrix appears once
    return total - _numel(emb) - (0 if head is emb else _numel(head)), _numel(head)


def frozen_flop_params(model) -> tuple[int, int]:
    """(frozen body, frozen head) parameter counts: the parts of `flop_params` that take no gradient (LoRA's
    base weights), for `train_flops`' frozen_body / frozen_head."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    body = sum(_numel(p) for n, p in model.named_parameters()
               if not p.requires_grad and IDLE_COPY not in n and p is not emb and p is not head)
    return body, (0 if head.requires_grad else _numel(head))
