"""GPT demo: a small GPT-2 on packed Wikipedia token streams with document-aware attention.

maskjax train --config=configs/demo/gpt.py --workdir=/tmp/gpt-demo
"""

import ml_collections

from maskjax import defaults


def get_config() -> ml_collections.ConfigDict:
    c = defaults.base("gpt")
    c.total_steps = 1000
    c.global_batch_size = 32
    c.log_every = 50
    c.eval_every = 250
    c.checkpoint_every = 250
    c.keep_checkpoints = 2

    c.data.update(name="wikipedia_gpt128", layout="gpt", seq_length=128, vocab_size=8192)
    c.model.update(vocab_size=8192, max_length=128, hidden=128, layers=2, heads=2, mlp_dim=512, dropout=0.1)
    c.optimizer.update(
        name="adamw",
        peak_lr=1e-3,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip=1.0,
        no_decay=("bias", "scale", "position"),
    )
    c.schedule.update(warmup_steps=100, decay="cosine", end_lr=1e-4)
    return c
