"""Stage one of BEiT: the visual tokenizer whose codes configs/beit_{base,large}.py predict.

BEiT used the DALL-E dVAE (Bao et al. 2022, Sec. 2.1.2), trained by OpenAI on 250M images; its
weights cannot be fetched here, so maskjax trains a VQ-VAE (van den Oord et al. 2017) with the same
interface — 8192 codes, one per 16×16 patch of a 224×224 image — on ImageNet-1k. The training
recipe below is ours (not from a paper): AdamW 1e-3, cosine, 100 epochs.

  maskjax train --config=configs/beit_tokenizer.py --workdir=TOK
  maskjax train --config=configs/beit_base.py --workdir=DIR --config.masking.tokenizer_workdir=TOK
"""

import math
from pathlib import Path

import ml_collections

from maskjax import defaults


def get_config() -> ml_collections.ConfigDict:
    beit = defaults.from_file(Path(__file__).with_name("beit_base.py"))
    c = defaults.base("vqvae")
    c.global_batch_size = 1024
    epochs = 100
    c.total_steps = math.ceil(epochs * 1_281_167 / c.global_batch_size)  # ImageNet-1k train images
    c.log_every = 500
    c.eval_every = 5000
    c.eval_batches = 10
    c.checkpoint_every = 5000
    c.hardware = dict(accelerator="v3-32", topology="v3:4x4", description="TPU v3, 32 cores", num_devices=32)
    c.data.update(beit.data.to_dict())
    c.model.update(beit.masking.tokenizer.to_dict())  # the one definition BEiT's configs check against
    c.optimizer.update(name="adamw", peak_lr=1e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip=1.0)
    c.schedule.update(warmup_steps=2000, decay="cosine", end_lr=0.0)
    return c
