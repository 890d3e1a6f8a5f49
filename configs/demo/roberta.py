"""RoBERTa demo: FULL-SENTENCES packing, dynamic masking, no NSP, byte-level BPE — on Wikipedia.

maskjax train --config=configs/demo/roberta.py --workdir=/tmp/roberta-demo
"""

import ml_collections

from maskjax import defaults


def get_config() -> ml_collections.ConfigDict:
    c = defaults.base("roberta")
    c.total_steps = 1000
    c.global_batch_size = 32
    c.log_every = 50
    c.eval_every = 250
    c.checkpoint_every = 250
    c.keep_checkpoints = 2

    # A trained byte-level BPE with RoBERTa's specials: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4.
    c.data.update(name="wikipedia_roberta128", layout="roberta", seq_length=128, vocab_size=8192)
    c.masking = dict(
        strategy="roberta",
        mask_prob=0.15,  # RoBERTa Sec. 2.1 / 4.1
        max_predictions=24,
        mask_id=4,
        pad_id=1,
        special_ids=(0, 2),
    )
    c.model.update(
        vocab_size=8192,
        max_length=130,  # positions start after the padding id: 128 + pad_id + 1
        type_vocab_size=1,
        pad_id=1,
        position_offset=2,
        nsp=False,
        pooler=False,
        hidden=128,
        layers=2,
        heads=2,
        mlp_dim=512,
        layer_norm_eps=1e-5,
    )
    c.optimizer.update(
        name="adamw",
        peak_lr=1e-3,
        b1=0.9,
        b2=0.98,  # RoBERTa Sec. 3.1: β2 = 0.98 for stability at large batch
        eps=1e-6,
        weight_decay=0.01,
        grad_clip=None,
        no_decay=("bias", "scale"),
    )
    c.schedule.update(warmup_steps=100, decay="linear", end_lr=0.0)
    # A ridge probe on mean-pooled features of labelled movie-review sentences (gensim's polarity set).
    c.evals.ridge.every = 250
    return c
