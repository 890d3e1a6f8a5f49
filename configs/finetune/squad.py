"""Fine-tune a BERT encoder for extractive QA with BERT's SQuAD v1.1 recipe (Devlin et al. 2019, Sec. 4.2).

BERT Sec. 4.2: 3 epochs, lr 5e-5, batch 32; the release's run_squad.py: max_seq_length 384,
doc_stride 128, max_query_length 64, max_answer_length 30, warmup over the first 10% of steps then
linear decay, weight decay 0.01. Start/end logits from one dense layer over every token. The encoder's
sizes come from --init (any BERT or RoBERTa); without it, a fresh encoder of the BERT demo's sizes.

  maskjax finetune --config=configs/finetune/squad.py --init=BERT_DIR --workdir=/tmp/squad   # tfds squad
  maskjax finetune --config=configs/finetune/squad.py:squad_json --config.data.root=MY_FOLDER \
      --config.data.train_examples=N --init=BERT_DIR --workdir=/tmp/qa       # MY_FOLDER/{train,dev}.json

Epochs count questions (data.train_examples); a long context gives several windows, so an epoch is a
little more than that many windows' worth of steps (SQuAD's 87,599 questions make about 88.6k windows
with BERT's tokenizer).
"""

from pathlib import Path

import ml_collections

from maskjax import defaults

DATA = {  # variant -> (dataset, train split, eval split, training questions)
    "squad": ("squad", "train", "validation", 87599),
    "squad_json": ("squad_json", "train", "dev", 1000),
}
ENCODER = ("vocab_size", "hidden", "layers", "heads", "mlp_dim")


def get_config(data: str = "squad") -> ml_collections.ConfigDict:
    dataset, train_split, eval_split, questions = defaults.variant(DATA, data)
    demo = defaults.from_file(Path(__file__).parents[1] / "demo" / "bert.py")
    c = defaults.base("span_qa")
    c.global_batch_size = 32
    c.data.update(dataset=dataset, train_split=train_split, eval_split=eval_split)
    c.data.train_examples = questions
    c.schedule.update(epochs=3, decay="linear", end_lr=0.0)
    defaults.steps_from_epochs(c, c.data.get_ref("train_examples"), warmup_percent=10)
    c.log_every = 50
    c.eval_every = c.get_ref("total_steps") + 0  # a new reference: setting one leaves total_steps
    c.eval_batches = 4
    c.checkpoint_every = c.get_ref("total_steps") + 0
    c.keep_checkpoints = 1
    c.model.update(
        {k: demo.model[k] for k in ENCODER},
        span_head=True,
        mlm_head=False,
        nsp=False,
        pooler=False,
        dropout=0.1,
    )
    c.optimizer.update(
        name="adamw", peak_lr=5e-5, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, grad_clip=1.0,
        no_decay=("bias", "scale"),
    )  # fmt: skip
    return c
