"""Hand counts of an MM-DiT's work, the denominators of MFU (XLA's own count includes what remat recomputes)."""

from __future__ import annotations


def mmdit_forward_flops(cfg: dict, batch: int, text_tokens: int) -> float:
    """Matmul FLOPs of one MM-DiT forward (2 per multiply-add), by hand: the figure MFU divides by."""
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    image_tokens = (cfg["sample_size"] // cfg["patch_size"]) ** 2
    tokens = image_tokens + text_tokens
    per_block = 0.0
    for stream_tokens in (image_tokens, text_tokens):
        per_block += 2 * stream_tokens * (4 * width * width + 2 * 4 * width * width)  # qkv + out, 4x MLP
    per_block += 2 * 2 * tokens * tokens * width                                      # QK^T and AV
    dual = len(cfg.get("dual_attention_layers", ()))
    extra_dual = dual * (2 * image_tokens * 4 * width * width + 2 * 2 * image_tokens ** 2 * width)
    return batch * (cfg["num_layers"] * per_block + extra_dual)


def attention_logits(cfg: dict, rows: float, text_tokens: int) -> float:
    """Attention-score elements of one MM-DiT forward: joint attention in every block, plus the image-only
    attention of the dual-attention (MMDiT-X) blocks."""
    image_tokens = (cfg["sample_size"] // cfg["patch_size"]) ** 2
    tokens = image_tokens + text_tokens
    dual = len(cfg.get("dual_attention_layers", ()))
    return rows * cfg["num_attention_heads"] * (cfg["num_layers"] * tokens ** 2 + dual * image_tokens ** 2)


# HBM bytes per attention score per forward pass when the scores are materialised (XLA's attention, no flash
# kernel): f32 logits written and read by the softmax, bf16 probabilities written and read by the AV matmul.
# A remat'ed, differentiated call makes ~4 such passes (forward, recomputed forward, backward ~2x).
LOGIT_BYTES = 4 + 4 + 2 + 2
