"""Fine-tune a RoBERTa encoder on labelled text with RoBERTa's GLUE recipe (Liu et al. 2019, Table 10).

RoBERTa Table 10 (GLUE): lr the best of {1e-5, 2e-5, 3e-5}, batch {16, 32}, weight decay 0.1, at most
10 epochs, warmup over the first 6% of steps then linear decay, Adam β = (0.9, 0.98), ε = 1e-6,
dropout 0.1. The classifier is RobertaClassificationHead's: dense + tanh on <s>, then a linear layer
(here the pooler and the classifier, both fresh). The data variants and sizes-from---init are those
of configs/finetune/bert.py; without --init, a fresh encoder of the RoBERTa demo's sizes.

  maskjax finetune --config=configs/finetune/roberta.py:polarity --init=/tmp/roberta-demo --workdir=/tmp/pol
"""

from pathlib import Path

import ml_collections

from maskjax import defaults

ENCODER = ("vocab_size", "max_length", "type_vocab_size", "pad_id", "position_offset", "layer_norm_eps")


def get_config(data: str = "reuters_grain") -> ml_collections.ConfigDict:
    c = defaults.from_file(Path(__file__).with_name("bert.py"), data)
    demo = defaults.from_file(Path(__file__).parents[1] / "demo" / "roberta.py")
    c.model.update({k: demo.model[k] for k in ENCODER})
    c.schedule.epochs = 10
    defaults.steps_from_epochs(c, c.data.get_ref("train_examples"), warmup_percent=6)
    c.optimizer.update(peak_lr=2e-5, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1)
    return c
