"""GPT-2 small (117M in the paper's Table 2) pre-training: Radford et al. 2019, "Language Models are
Unsupervised Multitask Learners", Sec. 2.2-2.3.

What the GPT-2 paper states: WebText (Sec. 2.2), byte-level BPE with 50,257 tokens, a 1024-token
context and "a larger batchsize of 512" (Sec. 2.3), the four sizes of Table 2, and that "the learning
rate of each model was manually tuned for the best perplexity on a 5% held-out sample of WebText"
(Sec. 3) — without the values. It gives no optimizer, schedule, step count or hardware.

The missing values are GPT-3's (Brown et al. 2020), whose smallest models are GPT-2's architecture at
nearly GPT-2's sizes: Table 2.1's learning rate for the matching size and Appendix B's recipe (Adam
β=(0.9, 0.95), ε=1e-8, global-norm clipping 1.0, weight decay 0.1, warmup over 375M tokens, cosine
decay to 10% of the peak, 300B training tokens). They are a documented choice, not GPT-2's numbers.

  maskjax describe --config=configs/gpt2_small.py
  maskjax train --config=configs/gpt2_small.py --workdir=DIR --config.data.corpus=/path/to/webtext

The other three sizes of Table 2 are variants of this file — `--config=configs/gpt2_small.py:medium`
(`:large`, `:xl`) — which configs/gpt2_{medium,large,xl}.py name; those files hold the memory notes
behind each size's remat and mesh.
"""

import dataclasses
import math
from collections.abc import Callable

import ml_collections

from maskjax import defaults, models
from maskjax.models import gpt

SEQ, BATCH = 1024, 512  # GPT-2 Sec. 2.3
TOKENS_PER_STEP = SEQ * BATCH  # 524,288 (GPT-3 Table 2.1 trains Small-Large at the same 0.5M tokens)


@dataclasses.dataclass(frozen=True)
class Size:
    """What differs between GPT-2's sizes: the model, GPT-3 Table 2.1's learning rate, memory savers."""

    model: Callable[..., gpt.GptConfig]
    peak_lr: float
    remat: str = "none"
    fsdp: int = 1


SIZES = {
    # Table 2: 12 layers, d_model 768 (12 heads), FFN 4·d.
    "small": Size(gpt.gpt2_small, peak_lr=6e-4),  # GPT-3 Table 2.1, "Small" (125M)
    # Table 2: 24 layers, d_model 1024 (16 heads). Without remat 15.9 GiB > a v3 core's 15.5 usable.
    "medium": Size(gpt.gpt2_medium, peak_lr=3e-4, remat="dots"),  # GPT-3 Table 2.1, "Medium (350M)"
    # Table 2: 36 layers, d_model 1280 (20 heads). 774M parameters: FSDP over 8 cores and "dots".
    "large": Size(gpt.gpt2_large, peak_lr=2.5e-4, remat="dots", fsdp=8),  # GPT-3, "Large (760M)"
    # Table 2: 48 layers, d_model 1600 (25 heads). 1.56B parameters: FSDP over 8 cores and "dots".
    "xl": Size(gpt.gpt2_xl, peak_lr=2e-4, remat="dots", fsdp=8),  # GPT-3, "XL (1.3B)", the nearest size
}


def get_config(size: str = "small") -> ml_collections.ConfigDict:
    s = defaults.variant(SIZES, size)
    c = defaults.base("gpt")
    c.total_steps = math.ceil(300e9 / TOKENS_PER_STEP)  # GPT-3 Sec. 2.2 / Table 2.1: 300B tokens
    c.global_batch_size = BATCH
    c.log_every = 1000
    c.eval_every = 10_000
    c.checkpoint_every = 10_000

    # The paper names no hardware. 256 TPU v3 cores is a second-hand figure from press coverage at the
    # release (The Register, Feb. 2019), not a paper fact; it is used here as the target slice.
    # 124M parameters and 2 sequences per core: pure data parallel, 6.8 GiB per v3 core (maskjax.aot).
    # The larger sizes shard parameters and optimizer state over `fsdp` cores (SIZES).
    c.hardware = dict(
        accelerator="v3-256",
        topology="v3:8x16",
        description="TPU v3, 256 cores (not stated in the paper; reported in the press)",
        num_devices=256,
    )
    c.mesh.fsdp = s.fsdp

    c.data.update(
        name="webtext_gpt",
        layout="gpt",  # whole documents packed into 1024-token rows, <|endoftext|> between them
        corpus="REQUIRED: --config.data.corpus=/path/to/webtext",
        seq_length=SEQ,
        vocab_size=50257,  # Sec. 2.2: byte-level BPE, 50,257 tokens
    )
    # Sec. 2.3 / Table 2: the size's layers and d_model (heads of 64, 4·d feed-forward as GPT), pre-LN,
    # final LN.
    c.model.update(models.config_to_dict(s.model(dtype="bfloat16", remat=s.remat)))
    c.optimizer.update(
        name="adamw",
        peak_lr=s.peak_lr,  # GPT-3 Table 2.1 for the size; GPT-2 tuned it per size and did not publish it
        b1=0.9,  # GPT-3 Appendix B
        b2=0.95,  # GPT-3 Appendix B
        eps=1e-8,  # GPT-3 Appendix B
        weight_decay=0.1,  # GPT-3 Appendix B
        grad_clip=1.0,  # GPT-3 Appendix B
        # GPT (Radford et al. 2018, Sec. 4.1): decay "on all non bias or gain weights".
        no_decay=("bias", "scale"),
    )
    # GPT-3 Appendix B: linear warmup over 375M tokens, cosine decay to 10% of the peak over 260B tokens,
    # then constant. Here the cosine spans all 300B tokens (the schedule has no constant tail).
    c.schedule.update(warmup_steps=math.ceil(375e6 / TOKENS_PER_STEP), decay="cosine")
    c.schedule.end_lr = c.optimizer.get_ref("peak_lr") * 0.1  # follows --config.optimizer.peak_lr
    return c
