"""RoBERTa-base pre-training as in Liu et al. 2019, "RoBERTa: A Robustly Optimized BERT Pretraining
Approach", Table 9 (pre-training hyperparameters) and Sec. 3-5.

  maskjax describe --config=configs/roberta_base.py
  maskjax train --config=configs/roberta_base.py --workdir=DIR \\
      --config.data.corpus=/path/to/corpus    # one document per file (or a glob)

The corpus is the user's: the paper's 160 GB are BookCorpus + Wikipedia, CC-News, OpenWebText and
Stories (Sec. 3.2). The first run prepares it with a newly trained 50,265-entry byte-level BPE
(Sec. 4.4; specials <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4) into $MASKJAX_DATA_DIR/<data.name>.

RoBERTa-large is a variant of this file, `--config=configs/roberta_base.py:large`, which
configs/roberta_large.py names: Table 9 differs between the sizes in three values only.
"""

import dataclasses
from collections.abc import Callable

import ml_collections
from ml_collections import config_dict

from maskjax import defaults, models
from maskjax.models import bert


@dataclasses.dataclass(frozen=True)
class Size:
    """What Table 9 changes between the sizes: the model, the peak learning rate and the warmup."""

    model: Callable[..., bert.BertConfig]
    peak_lr: float
    warmup_steps: int


SIZES = {
    "base": Size(bert.roberta_base, peak_lr=6e-4, warmup_steps=24_000),  # Table 9 (base): 6e-4, 24K steps
    "large": Size(bert.roberta_large, peak_lr=4e-4, warmup_steps=30_000),  # Table 9 (large): 4e-4, 30K steps
}


def get_config(size: str = "base") -> ml_collections.ConfigDict:
    s = defaults.variant(SIZES, size)
    c = defaults.base("roberta")
    c.total_steps = 500_000  # Table 9: max steps 500K (Sec. 5: "pretrain for ... 500K steps")
    c.global_batch_size = 8192  # Table 9: batch size 8K sequences (Sec. 3.1 / 5)
    c.log_every = 1000
    c.eval_every = 10_000
    c.checkpoint_every = 10_000

    # Sec. 3.1: "DGX-1 machines, each with 8 × 32GB Nvidia V100 GPUs"; Sec. 5: "We pretrain our model using
    # 1024 V100 GPUs" (said of RoBERTa-large; the paper gives no separate figure for base). No TPU topology.
    # 125M parameters: pure data parallel (the default mesh), 8 sequences of 512 per GPU; large: 355M
    # (memory: configs/roberta_large.py).
    c.hardware = dict(
        accelerator="v100-32gb",
        topology=config_dict.placeholder(str),  # GPUs: no TPU topology
        description="1024 NVIDIA V100 32GB GPUs (DGX-1 machines, 8 each)",
        num_devices=1024,
    )

    c.data.update(
        name="roberta_corpus",
        layout="roberta",  # FULL-SENTENCES packing across documents, no NSP (Sec. 4.2)
        corpus="REQUIRED: --config.data.corpus=/path/to/corpus",
        seq_length=512,  # Sec. 3.1: "we train only with full-length sequences" (T = 512)
        vocab_size=50265,
    )
    c.masking = dict(
        strategy="roberta",  # dynamic masking, a fresh mask every step (Sec. 4.1), fairseq's counting
        mask_prob=0.15,  # Sec. 2.1 (BERT's 15%, 80/10/10)
        max_predictions=77,  # ceil(0.15 × 512): fairseq predicts every masked token, none is dropped
        mask_id=4,
        pad_id=1,
        special_ids=(0, 2, 3),  # <s>, </s>, <unk>: never a random replacement (fairseq: nspecial)
    )
    # BERT-base sizes (Sec. 2 / Table 9: L=12, H=768, A=12, FFN 3072, dropout 0.1, attention dropout 0.1),
    # BERT-large sizes for large (Table 9: L=24, H=1024, A=16, FFN 4096), with RoBERTa's 50K byte-level
    # BPE, one segment, no NSP and fairseq positions (models.bert).
    c.model.update(models.config_to_dict(s.model(dtype="bfloat16")))
    c.optimizer.update(
        name="adamw",
        peak_lr=s.peak_lr,  # Table 9: peak learning rate 6e-4 (base), 4e-4 (large)
        b1=0.9,  # Table 9
        b2=0.98,  # Table 9 / Sec. 3.1: β2 = 0.98 for stability with large batches
        eps=1e-6,  # Table 9
        weight_decay=0.01,  # Table 9
        grad_clip=None,  # Table 9: gradient clipping 0.0 (none)
        no_decay=(),  # fairseq's Adam decays every parameter (one parameter group), biases and LayerNorm too
    )
    # Table 9: warmup 24K steps (base), 30K (large), then linear decay (to 0: fairseq's polynomial_decay).
    c.schedule.update(warmup_steps=s.warmup_steps, decay="linear", end_lr=0.0)
    return c
