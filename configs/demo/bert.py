"""BERT demo: a small BERT pre-trained on real Wikipedia articles (gensim's bundled sample).

The corpus and a WordPiece vocabulary are prepared locally on first use (no
network). Whole-word masking, NSP, AdamW with linear warmup and decay, as in
configs/bert_base.py — at a size that trains in a few minutes on 2 CPU cores.

  maskjax train --config=configs/demo/bert.py --workdir=/tmp/bert-demo
"""

import ml_collections

from maskjax import defaults


def get_config() -> ml_collections.ConfigDict:
    c = defaults.base("bert")
    c.total_steps = 1000
    c.global_batch_size = 32
    c.log_every = 50
    c.eval_every = 250
    c.checkpoint_every = 250
    c.keep_checkpoints = 2

    # A trained WordPiece vocabulary: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.
    c.data.update(name="wikipedia_bert128", layout="bert", seq_length=128, vocab_size=8192)
    c.masking = dict(
        strategy="whole_word",
        mask_prob=0.15,  # BERT Sec. 3.1
        max_predictions=20,  # BERT README: max_predictions_per_seq = 20 at length 128
        mask_id=4,
        pad_id=0,
        special_ids=(2, 3),  # [CLS], [SEP] are never chosen
    )
    c.model.update(
        vocab_size=8192,
        max_length=128,
        hidden=128,
        layers=2,
        heads=2,
        mlp_dim=512,
        dropout=0.1,
        attention_dropout=0.1,
    )
    c.optimizer.update(
        name="adamw",
        peak_lr=1e-3,
        b1=0.9,
        b2=0.999,
        eps=1e-6,
        weight_decay=0.01,
        grad_clip=1.0,
        no_decay=("bias", "scale"),  # BERT's optimizer skips LayerNorm and biases only
    )
    c.schedule.update(warmup_steps=100, decay="linear", end_lr=0.0)
    # A ridge probe on mean-pooled features of labelled movie-review sentences (gensim's polarity set).
    c.evals.ridge.every = 250
    return c
