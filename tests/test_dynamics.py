"""Training dynamics against transformers + torch.optim.AdamW: from the same initial weights, on the same
masked batches, with the same AdamW (decoupled weight decay off biases and norms, gradient clipping)
and the same warmup + linear decay, 20 steps give the same loss at every step (fp32, no dropout).

Forward parity is tested elsewhere; this checks the loss, the masking contract (maskjax's masks drawn
from the step's key, fed to torch as labels) and the optimizer together, step after step."""

from __future__ import annotations

import jax
import numpy as np
import torch
import transformers
from tiny_configs import demo

from maskjax import interop, models, train
from maskjax.methods import bert as bert_method

STEPS, BATCH, SEQ, VOCAB = 20, 8, 32, 100
OPTIMIZER = dict(name="adamw", peak_lr=2e-3, b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.1, grad_clip=0.5)
WARMUP = 5
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _config(family: str, hf_dir):
    c = demo(family)
    _, cfg = interop.config_of(hf_dir)
    c.model.update({k: v for k, v in models.config_to_dict(cfg).items() if k in c.model})
    c.update(global_batch_size=BATCH, total_steps=STEPS, init=str(hf_dir))
    c.data.seq_length = SEQ
    c.optimizer.update(OPTIMIZER, no_decay=("bias", "scale"), bias_correction=True)
    c.schedule.update(warmup_steps=WARMUP, decay="linear", end_lr=0.0)
    return c


def _torch_losses(hf: torch.nn.Module, batches: list[dict]) -> list[float]:
    """torch.optim.AdamW with weight decay on matrices and embeddings (not on biases or LayerNorm),
    transformers' linear warmup + decay, clip_grad_norm_: the usual transformers fine-tuning loop."""
    named = list(hf.named_parameters())
    groups = [
        {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": OPTIMIZER["weight_decay"]},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(
        groups, lr=OPTIMIZER["peak_lr"], betas=(OPTIMIZER["b1"], OPTIMIZER["b2"]), eps=OPTIMIZER["eps"]
    )
    sched = transformers.get_linear_schedule_with_warmup(opt, WARMUP, STEPS)
    hf.train()  # dropout is 0: train mode changes nothing else in these models
    out = []
    for batch in batches:
        loss = hf(**{k: torch.tensor(np.asarray(v, np.int64)) for k, v in batch.items()}).loss
        out.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), OPTIMIZER["grad_clip"])
        opt.step()
        sched.step()
        opt.zero_grad()
    return out


def _maskjax_losses(config, batches: list[dict]) -> tuple[list[float], train.Trainer]:
    trainer = train.Trainer(config)
    state = trainer.init_from(config.init)
    out = []
    for batch in batches:
        state, metrics = trainer.train_step(state, trainer.put_batch(batch), None)
        out.append(float(metrics["loss"]))
    return out, trainer


def _zero_dropout(**kw):
    return dict(SMALL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


def test_bert_pretraining_steps_match_transformers_and_torch_adamw(tmp_path, capsys):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=SEQ, **_zero_dropout())
    hf = transformers.BertForPreTraining(config)
    hf.save_pretrained(tmp_path)
    c = _config("bert", tmp_path)
    c.masking.update(strategy="bert", max_predictions=6, mask_id=4, pad_id=0, special_ids=(2, 3))
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(STEPS):
        ids = rng.integers(5, 21, size=(BATCH, SEQ)).astype(np.int32)  # 16 of the 100: learnt in 20 steps
        lengths = rng.integers(SEQ // 2, SEQ + 1, size=BATCH)
        real = np.arange(SEQ)[None] < lengths[:, None]
        split = lengths // 2
        ids[:, 0] = 2
        ids[np.arange(BATCH), split] = 3
        ids[np.arange(BATCH), lengths - 1] = 3
        ids = np.where(real, ids, 0)
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": real.astype(np.int32),
                "token_type_ids": ((np.arange(SEQ)[None] > split[:, None]) & real).astype(np.int32),
                "word_starts": real,
                "special_tokens_mask": np.isin(ids, (0, 2, 3)),
                "next_sentence_label": rng.integers(0, 2, size=BATCH).astype(np.int32),
            }
        )
    ours, trainer = _maskjax_losses(c, batches)
    assert "freshly initialised" not in capsys.readouterr().out  # every weight is the torch model's

    # The same masks the steps drew: from each step's key, as Trainer._train_step and the loss split it.
    masked = []
    for step, batch in enumerate(batches):
        k_mask = jax.random.split(jax.random.fold_in(trainer.train_key, step))[0]
        m = bert_method.mask(k_mask, {k: np.asarray(v) for k, v in batch.items()}, VOCAB, c.masking)
        labels = np.full((BATCH, SEQ), -100, np.int64)
        pos, tgt, w = (np.asarray(x) for x in (m.positions, m.targets, m.weights))
        rows = np.arange(BATCH)[:, None].repeat(pos.shape[1], 1)
        labels[rows[w > 0], pos[w > 0]] = tgt[w > 0]
        assert (labels != -100).sum() == w.sum() > 0  # no position masked twice
        masked.append(
            {
                "input_ids": np.asarray(m.inputs),
                "attention_mask": batch["attention_mask"],
                "token_type_ids": batch["token_type_ids"],
                "labels": labels,
                "next_sentence_label": batch["next_sentence_label"],
            }
        )
    theirs = _torch_losses(hf, masked)
    assert ours[-1] < ours[0] - 0.1  # it trains: the comparison is not of 20 equal numbers
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def test_gpt2_steps_match_transformers_and_torch_adamw(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, n_inner=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(config)
    hf.save_pretrained(tmp_path)
    c = _config("gpt", tmp_path)
    rng = np.random.default_rng(1)
    # A learnable stream (each token mostly follows from the one before), so the loss really falls.
    table = rng.integers(0, VOCAB, size=VOCAB)
    batches = []
    for _ in range(STEPS):
        ids = np.empty((BATCH, SEQ), np.int32)
        ids[:, 0] = rng.integers(0, VOCAB, size=BATCH)
        for t in range(1, SEQ):
            ids[:, t] = np.where(rng.random(BATCH) < 0.8, table[ids[:, t - 1]], rng.integers(0, VOCAB, BATCH))
        batches.append({"input_ids": ids, "segment_ids": np.ones_like(ids)})
    ours, _ = _maskjax_losses(c, batches)
    theirs = _torch_losses(hf, [{"input_ids": b["input_ids"], "labels": b["input_ids"]} for b in batches])
    assert ours[-1] < ours[0] - 0.1
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
