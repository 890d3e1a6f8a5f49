"""Masking strategies: pure functions of ``(key, arrays, static config)`` with static output shapes.

Every strategy is batch-level: inputs are ``(B, T)`` token ids (or ``B`` images of ``N`` patches) and
row ``b`` is masked with the key ``fold_in(key, b)``, so a row's mask does not depend on the batch
size or on how the batch is sharded, and the same key always gives the same mask. All functions jit
and vmap; nothing branches in Python on traced values.

By objective:

  mlm       masked LM over tokens -> MlmMask: bert_mlm, whole_word_mlm, span_mlm, roberta_mlm (+ step_key),
            random_token_mask, contiguous_block_mask; gather_positions for the P prediction slots
  causal    next-token prediction -> CausalLm: causal_lm, causal_segment_mask (packed documents)
  image     patches -> MaeMask (mae_random_mask, mae_mask_from_noise), BEiT blocks (beit_block_mask,
            and the released sampler beit_unilm_mask)
  _rows     the shared row machinery: per-row keys and bits, scores, 80/10/10, _finish_row

Example (BERT-base: T=128, max_predictions_per_seq=20; BERT README, "Pre-training with BERT")::

    key = step_key(seed=0, step=step)                # a fresh mask every step (RoBERTa Sec. 4.1)
    m = bert_mlm(key, ids, vocab_size=30522, mask_id=103, special_ids=(101, 102), pad_id=0,
                 max_predictions=20)
    hidden = encoder(m.inputs)                       # (B, T, D)
    logits = head(gather_positions(hidden, m.positions))   # (B, 20, vocab)
    loss = losses.masked_cross_entropy(logits, m.targets, m.weights)
"""

# MASK/RANDOM/KEEP (SpanPlan.decision codes) and _span_plan are not in __all__ but are imported by the tests.
from maskjax.masking._rows import KEEP as KEEP
from maskjax.masking._rows import MASK as MASK
from maskjax.masking._rows import RANDOM as RANDOM
from maskjax.masking._rows import MlmMask
from maskjax.masking.causal import CausalLm, causal_lm, causal_segment_mask
from maskjax.masking.image import (
    BeitBlocks,
    MaeMask,
    beit_block_mask,
    beit_block_mask_with_blocks,
    beit_unilm_blocks,
    beit_unilm_mask,
    mae_mask_from_noise,
    mae_num_keep,
    mae_random_mask,
)
from maskjax.masking.mlm import (
    SpanPlan,
    bert_mlm,
    bert_num_to_predict,
    contiguous_block_mask,
    gather_positions,
    random_token_mask,
    roberta_mlm,
    span_length_probs,
    span_mlm,
    step_key,
    whole_word_mlm,
)
from maskjax.masking.mlm import _span_plan as _span_plan

__all__ = [
    "MlmMask",
    "CausalLm",
    "MaeMask",
    "BeitBlocks",
    "SpanPlan",
    "bert_mlm",
    "whole_word_mlm",
    "span_mlm",
    "roberta_mlm",
    "step_key",
    "causal_lm",
    "causal_segment_mask",
    "mae_num_keep",
    "mae_mask_from_noise",
    "mae_random_mask",
    "beit_block_mask",
    "beit_block_mask_with_blocks",
    "beit_unilm_blocks",
    "beit_unilm_mask",
    "random_token_mask",
    "contiguous_block_mask",
    "gather_positions",
    "bert_num_to_predict",
    "span_length_probs",
]
