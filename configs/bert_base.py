"""BERT-base pre-training as in Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding" (NAACL), Sec. 3.1 and Appendix A.2.

  maskjax describe --config=configs/bert_base.py
  maskjax train --config=configs/bert_base.py --workdir=DIR \\
      --config.data.corpus=/path/to/bookcorpus_and_wikipedia   # one document per file (or a glob)

The corpus (BooksCorpus + English Wikipedia, Sec. 3.1) is the user's: `data.corpus` names it, and
the first run prepares it with a newly trained 30,522-entry WordPiece vocabulary into
$MASKJAX_DATA_DIR/<data.name>. To use BERT's own vocabulary instead, run `maskjax prepare-text
--inputs=CORPUS --out=$MASKJAX_DATA_DIR/bert_books_wiki --layout=bert --max_length=128,512
--tokenizer=bert-base-uncased/vocab.txt` first and set masking.mask_id=103, masking.special_ids=(101, 102)
(the trainer checks them against the prepared tokenizer).

BERT-large is a variant of this file, `--config=configs/bert_base.py:large`, which configs/bert_large.py
names: Appendix A.2 gives one recipe for both sizes.
"""

import dataclasses
from collections.abc import Callable

import ml_collections

from maskjax import defaults, models
from maskjax.models import bert


@dataclasses.dataclass(frozen=True)
class Size:
    """What differs between BERT's sizes: the model and the hardware A.2 reports for it."""

    model: Callable[..., bert.BertConfig]
    hardware: dict


SIZES = {
    # A.2: "BERT-base was performed on 4 Cloud TPUs in Pod configuration (16 TPU chips total)". The paper
    # does not name the TPU generation; this project targets TPU v3 (2 cores per chip): 16 chips = 32 cores.
    # Pure data parallel, 8 sequences per core: 2.9 GiB of a 16 GiB v3 core (maskjax.aot on v3:4x4).
    "base": Size(
        bert.bert_base,
        dict(
            accelerator="v3-32", topology="v3:4x4", description="TPU v3, 32 cores (16 chips)", num_devices=32
        ),
    ),
    # A.2: "BERT-large was performed on 16 Cloud TPUs (64 TPU chips total)": 128 v3 cores, pure data
    # parallel (memory: configs/bert_large.py).
    "large": Size(
        bert.bert_large,
        dict(
            accelerator="v3-128",
            topology="v3:8x8",
            description="TPU v3, 128 cores (64 chips)",
            num_devices=128,
        ),
    ),
}


def get_config(size: str = "base") -> ml_collections.ConfigDict:
    s = defaults.variant(SIZES, size)
    c = defaults.base("bert")
    c.total_steps = 1_000_000  # A.2: "1,000,000 steps ... approximately 40 epochs over the 3.3B word corpus"
    c.global_batch_size = 256  # A.2: "batch size of 256 sequences"
    c.log_every = 1000
    c.eval_every = 10_000
    c.eval_batches = 20
    c.checkpoint_every = 10_000
    c.hardware = s.hardware  # the size's TPUs (SIZES), pure data parallel: the default mesh

    # A.2: sequences of 128 tokens for 90% of the steps, then 512 for the last 10% "to learn the positional
    # embeddings": two phases of one run (the state carries over; data and masking budget change).
    # max_predictions: the released code's max_predictions_per_seq, 20 at 128 and 80 at 512 (not in the
    # paper; google-research/bert README, "Pre-training with BERT").
    c.phases = [
        dict(until=0.9, data=dict(seq_length=128), masking=dict(max_predictions=20)),
        dict(until=1.0, data=dict(seq_length=512), masking=dict(max_predictions=80)),
    ]
    c.data.update(
        name="bert_books_wiki",
        layout="bert",  # [CLS] A [SEP] B [SEP] pairs with next-sentence labels (Sec. 3.1, Task #2)
        corpus="REQUIRED: --config.data.corpus=/path/to/bookcorpus_and_wikipedia",
        seq_length=128,  # phase 1; see c.phases
        vocab_size=30522,  # Sec. 3: WordPiece with a 30,000-token vocabulary (30,522 in the release)
    )
    c.masking = dict(
        strategy="bert",  # the paper masks WordPiece tokens; whole-word masking came with a later release
        mask_prob=0.15,  # Sec. 3.1, Task #1: 15% of the tokens, 80% [MASK] / 10% random / 10% unchanged
        max_predictions=20,  # phase 1; see c.phases
        # Ids of a WordPiece vocabulary trained by `prepare-text`: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.
        mask_id=4,
        pad_id=0,
        special_ids=(2, 3),
    )
    # Sec. 3: L=12, H=768, A=12 (FFN 4H = 3072) for base, L=24, H=1024, A=16 (FFN 4096), 340M parameters
    # for large; A.2: dropout 0.1 on all layers, GELU — the factory's values.
    # bf16 compute, fp32 parameters and optimizer state (DESIGN.md); --config.model.dtype=float32 for fp32.
    c.model.update(models.config_to_dict(s.model(dtype="bfloat16")))
    c.optimizer.update(
        name="adamw",  # A.2: Adam with L2 weight decay 0.01 (the release decouples it: AdamWeightDecay)
        peak_lr=1e-4,  # A.2
        b1=0.9,  # A.2
        b2=0.999,  # A.2
        eps=1e-6,  # not in the paper: the released optimization.py
        weight_decay=0.01,  # A.2
        grad_clip=1.0,  # not in the paper: the released optimization.py clips the global norm at 1.0
        no_decay=("bias", "scale"),  # the release exempts LayerNorm and bias from weight decay
        # not in the paper: the release's AdamWeightDecayOptimizer (optimization.py) uses Adam's moments
        # without bias correction; optax's Adam corrects them (--config.optimizer.bias_correction=True).
        bias_correction=False,
    )
    # A.2: "learning rate warmup over the first 10,000 steps, and linear decay of the learning rate" (to 0 in
    # the release, whose polynomial decay spans all steps; here it spans the steps after warmup).
    c.schedule.update(warmup_steps=10_000, decay="linear", end_lr=0.0)
    return c
