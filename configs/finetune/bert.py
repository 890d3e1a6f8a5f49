"""Fine-tune a BERT encoder on labelled text with BERT's GLUE recipe (Devlin et al. 2019, Sec. 4.1).

BERT Sec. 4.1 and A.3: batch 32, 3 epochs, lr the best of {5e-5, 4e-5, 3e-5, 2e-5}, Adam
β = (0.9, 0.999), weight decay 0.01, dropout 0.1, linear warmup over the first 10% of steps (the
release's run_classifier.py warmup_proportion) then linear decay; the classifier reads the pooled
[CLS]. The encoder's sizes come from --init (any BERT: this repo's demo, an imported BERT-base or
all-MiniLM-L6-v2); without --init, a fresh encoder of the BERT demo's sizes (the baseline).

  maskjax finetune --config=configs/finetune/bert.py:reuters_grain --init=/tmp/bert-demo --workdir=/tmp/grain
  maskjax finetune --config=configs/finetune/bert.py:reuters_grain --workdir=/tmp/grain-scratch \
      --config.data.tokenizer=/tmp/bert-demo/tokenizer                          # from scratch
  maskjax finetune --config=configs/finetune/bert.py:jsonl --config.data.root=MY_FOLDER \
      --config.data.train_examples=N --config.model.num_labels=C --init=...

Variants (data): reuters_grain, reuters_corn (Debian's weka), polarity (gensim), jsonl (your
SPLIT.jsonl files), and the tfds datasets sst2 and mnli once prepared (`tfds build glue/sst2
--file_format=array_record`). Epochs become steps from data.train_examples.
"""

from pathlib import Path

import ml_collections

from maskjax import defaults

# variant -> (dataset, train split, eval split, classes, training examples)
DATA = {
    "reuters_grain": ("reuters_grain", "train", "test", 2, 1554),
    "reuters_corn": ("reuters_corn", "train", "test", 2, 1554),
    "polarity": ("polarity", "train", "test", 2, 160),
    "jsonl": ("jsonl", "train", "test", 2, 1000),
    "sst2": ("glue/sst2", "train", "validation", 2, 67349),
    "mnli": ("glue/mnli", "train", "validation_matched", 3, 392702),
}
ENCODER = ("vocab_size", "max_length", "hidden", "layers", "heads", "mlp_dim")


def get_config(data: str = "reuters_grain") -> ml_collections.ConfigDict:
    dataset, train_split, eval_split, classes, examples = defaults.variant(DATA, data)
    demo = defaults.from_file(Path(__file__).parents[1] / "demo" / "bert.py")
    c = defaults.base("text_classification")
    c.global_batch_size = 32
    c.data.update(dataset=dataset, train_split=train_split, eval_split=eval_split, seq_length=128)
    c.data.train_examples = examples  # epochs -> steps
    c.schedule.update(epochs=3, decay="linear", end_lr=0.0)
    defaults.steps_from_epochs(c, c.data.get_ref("train_examples"), warmup_percent=10)
    c.log_every = 50
    c.eval_every = c.get_ref("total_steps") + 0  # a new reference: setting one leaves total_steps
    c.eval_batches = 4
    c.checkpoint_every = c.get_ref("total_steps") + 0
    c.keep_checkpoints = 1
    c.model.update(
        {k: demo.model[k] for k in ENCODER},
        num_labels=classes,
        mlm_head=False,
        nsp=False,
        pooler=True,
        dropout=0.1,
        attention_dropout=0.1,
    )
    c.optimizer.update(
        name="adamw",
        peak_lr=2e-5,
        b1=0.9,
        b2=0.999,
        eps=1e-6,
        weight_decay=0.01,
        grad_clip=1.0,
        no_decay=("bias", "scale"),
    )
    return c
