"""What a text run learned, shown rather than only scored: held-out sentences with a word masked and
filled in (BERT, RoBERTa), a greedy continuation of a held-out prompt and the perplexity beside a
unigram model's (GPT-2).

Both read the tokenizer the run copied to WORKDIR/tokenizer and decode with it.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from maskjax import infer, losses, masking
from maskjax.methods import gpt as gpt_method

SAMPLES = 3  # sentences (or prompts) shown
WINDOW = 12  # tokens of held-out text around each masked token
MEASURED = 64  # held-out rows the perplexities are measured on
ROWS = 8  # rows per forward pass


def fill_mask_samples(
    trainer: Any, params: dict, config: ml_collections.ConfigDict, workdir: epath.Path
) -> dict:
    """SAMPLES held-out windows, the middle token of each masked: the model's top token and its
    probability beside the token that was there."""
    from maskjax.data import loaders

    tok = infer.tokenizer_of(workdir)
    model = nnx.merge(trainer.graphdef, params)
    rows = loaders.first_batches(config, "eval", 1)["input_ids"]
    shown = []
    for row in rows:
        words = [int(t) for t in row if not tok.is_special([int(t)])[0]][:WINDOW]
        if len(words) < WINDOW:
            continue
        middle = WINDOW // 2
        truth = words[middle]
        ids = [tok.cls_id, *words[:middle], tok.mask_id, *words[middle + 1 :], tok.sep_id]
        probs = np.asarray(infer._mlm_probs(model, jnp.asarray([ids], jnp.int32)))[0, middle + 1]
        best = int(probs.argmax())
        masked = tok.decode(ids[1:-1], skip_special_tokens=False)
        shown.append(
            {
                "text": masked,
                "predicted": tok.decode([best], skip_special_tokens=False),
                "probability": float(probs[best]),
                "truth": tok.decode([truth], skip_special_tokens=False),
            }
        )
        if len(shown) == SAMPLES:
            break
    for s in shown:
        print(
            f"  {s['text']}  ->  {s['predicted']!r} ({s['probability']:.2f}; was {s['truth']!r})", flush=True
        )
    return {"fill_mask_samples": shown}


def greedy_sample_and_perplexity(
    trainer: Any, params: dict, config: ml_collections.ConfigDict, workdir: epath.Path
) -> dict:
    """A greedy continuation of a held-out prompt, and held-out perplexity exp(mean next-token NLL)
    beside a unigram model's (token frequencies of the training batches, add-one smoothed)."""
    from maskjax.data import loaders

    tok = infer.tokenizer_of(workdir)
    model = nnx.merge(trainer.graphdef, params)
    vocab = trainer.model_cfg.vocab_size
    batch = {k: v[:MEASURED] for k, v in loaders.first_batches(config, "eval", 1).items()}
    counts = (
        np.bincount(loaders.first_batches(config, "train", 8)["input_ids"].ravel(), minlength=vocab) + 1.0
    )
    log_unigram = jnp.asarray(np.log(counts / counts.sum()), jnp.float32)

    @jax.jit
    def measure(m: Any, b: dict) -> jax.Array:
        # (sum of the model's NLL, of the unigram model's, number of targets) over the rows: the
        # method's own loss (attention within each packed document) and the same targets.
        value, _ = gpt_method.loss(m, b, None, config, train=False)
        c = masking.causal_lm(b["input_ids"], b["segment_ids"], valid=b["segment_ids"] > 0)
        count = c.weights.sum()
        unigram = losses.weighted_mean(-log_unigram[c.targets], c.weights)
        return jnp.stack([value * count, unigram * count, count])

    # A few rows at a time: the (rows, T, V) logits of a paper-size batch would not fit one device.
    totals = sum(
        np.asarray(measure(model, {k: v[start : start + ROWS] for k, v in batch.items()}), np.float64)
        for start in range(0, len(batch["input_ids"]), ROWS)
    )
    model_nll, unigram_nll = totals[0] / totals[2], totals[1] / totals[2]
    held_out = batch["input_ids"]
    context = trainer.model_cfg.max_length
    prompt = [int(t) for t in held_out[0][: min(WINDOW, context // 3)]]
    new = infer.generate(
        model, prompt, max_new_tokens=min(24, context - len(prompt)), temperature=0.0, eos_id=tok.eos_id
    )
    result = {
        "eval_perplexity": math.exp(model_nll),
        "unigram_perplexity": math.exp(unigram_nll),
        "greedy_prompt": tok.decode(prompt, skip_special_tokens=False),
        "greedy_continuation": tok.decode(prompt + new, skip_special_tokens=False)[
            len(tok.decode(prompt, skip_special_tokens=False)) :
        ],
    }
    ppl, uni = result["eval_perplexity"], result["unigram_perplexity"]
    print(f"held-out perplexity: {ppl:.1f}   unigram baseline: {uni:.1f}", flush=True)
    print(f"  greedy: {result['greedy_prompt']!r} -> {result['greedy_continuation']!r}", flush=True)
    return result
