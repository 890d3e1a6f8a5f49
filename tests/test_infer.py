"""`maskjax fill-mask` and `maskjax generate` as a user runs them, against transformers' own
pipeline("fill-mask") and greedy generate() on the same (randomly initialised) checkpoints."""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax import infer
from maskjax.data import tokenizers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "maskjax", *args], capture_output=True, text=True, timeout=300, check=False
    )
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _texts() -> list[str]:
    """Real English prose that ships with Python: the docstrings of a few standard modules."""
    modules = (argparse, collections, json, logging, os, re, subprocess, textwrap)
    return [line for m in modules for line in (m.__doc__ or "").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A transformers BertForMaskedLM (random, seeded) with its fast tokenizer, as save_pretrained writes."""
    d = tmp_path_factory.mktemp("hf-bert")
    tok = tokenizers.train_wordpiece(_texts(), vocab_size=400)
    tok.save(d / "wordpiece")
    hf_tok = transformers.BertTokenizerFast(vocab_file=str(d / "wordpiece" / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=hf_tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    model = transformers.BertForMaskedLM(cfg).eval()
    with torch.no_grad():  # a peaked output layer, so that the top tokens are far apart
        model.cls.predictions.decoder.weight.mul_(8.0)
    model.save_pretrained(d / "hf")
    hf_tok.save_pretrained(d / "hf")
    return d / "hf"


@pytest.fixture(scope="module")
def bert_mj(bert_dir, tmp_path_factory):
    """`maskjax import-hf` of bert_dir, once for the module."""
    workdir = tmp_path_factory.mktemp("bert-mj")
    imported = _cli("import-hf", f"--hf-dir={bert_dir}", f"--out={workdir}")
    assert "tokenizer:" in imported.stdout and (workdir / "tokenizer" / "tokenizer.json").exists()
    return workdir


@pytest.mark.parametrize(
    "text",
    ["The module provides a [MASK] for the command line.", "[MASK] objects are [MASK] to the process."],
)
def test_fill_mask_of_an_imported_bert_gives_transformers_pipeline_top_k(bert_dir, bert_mj, text):
    workdir = bert_mj
    ours = json.loads(
        _cli("fill-mask", f"--workdir={workdir}", f"--text={text}", "--top-k=5", "--json").stdout
    )

    pipe = transformers.pipeline("fill-mask", model=str(bert_dir), tokenizer=str(bert_dir), top_k=5)
    theirs = pipe(text)
    theirs = theirs if isinstance(theirs[0], list) else [theirs]
    assert len(ours["masks"]) == len(theirs) == text.count("[MASK]")
    for mine, ref in zip(ours["masks"], theirs, strict=True):
        assert [r["token_id"] for r in mine] == [r["token"] for r in ref]
        np.testing.assert_allclose([r["score"] for r in mine], [r["score"] for r in ref], atol=1e-4)
        assert [r["token"] for r in mine] == [r["token_str"].strip() for r in ref]
    # The plain output: one block per mask, the best token first.
    plain = _cli("fill-mask", f"--workdir={workdir}", f"--text={text}", "--top-k=2").stdout
    assert plain.count("mask ") == text.count("[MASK]") and ours["masks"][0][0]["token"] in plain


def test_fill_mask_refuses_a_text_without_a_mask_and_a_gpt_checkpoint(bert_mj, gpt_mj):
    workdir = bert_mj
    result = _cli("fill-mask", f"--workdir={workdir}", "--text=no mask here", ok=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "has no [MASK]" in result.stderr.strip().splitlines()[-1]
    wrong = _cli(
        "fill-mask",
        f"--workdir={gpt_mj}",
        "--text=a [MASK]",
        f"--tokenizer={workdir / 'tokenizer'}",
        ok=False,
    )
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert "holds a 'gpt' checkpoint" in wrong.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    """A transformers RobertaForMaskedLM (random, seeded) with a byte-level BPE trained here, as
    save_pretrained writes them (vocab.json + merges.txt: RobertaTokenizerFast's own files)."""
    d = tmp_path_factory.mktemp("hf-roberta")
    tok = tokenizers.train_bpe(_texts(), vocab_size=500)  # RoBERTa's specials: <s> <pad> </s> <unk> <mask>
    tok.save(d / "bpe")
    # As in roberta-base's tokenizer.json, <mask> is lstrip: it takes the space before it.
    spec = json.loads((d / "bpe" / "tokenizer.json").read_text())
    for added in spec["added_tokens"]:
        added["lstrip"] = added["content"] == "<mask>"
    (d / "bpe" / "tokenizer.json").write_text(json.dumps(spec))
    hf_tok = transformers.RobertaTokenizerFast.from_pretrained(str(d / "bpe"))
    assert hf_tok("a <mask>")["input_ids"] == [0, *tok.encode("a"), tok.mask_id, 2]
    assert hf_tok.mask_token_id == tok.mask_id and hf_tok.pad_token_id == tok.pad_id == 1
    torch.manual_seed(2)
    cfg = transformers.RobertaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    model = transformers.RobertaForMaskedLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.decoder.weight.mul_(8.0)  # tied to the word embeddings: peaked outputs
    model.save_pretrained(d / "hf")
    hf_tok.save_pretrained(d / "hf")
    return d / "hf"


def test_fill_mask_of_an_imported_roberta_gives_transformers_pipeline_top_k(roberta_dir, tmp_path):
    """<mask> takes the space before it (lstrip), positions start at pad_id + 1: as transformers."""
    workdir = tmp_path / "mj"
    _cli("import-hf", f"--hf-dir={roberta_dir}", f"--out={workdir}")
    text = "The module provides a <mask> for the command line, and <mask> objects."
    ours = json.loads(
        _cli("fill-mask", f"--workdir={workdir}", f"--text={text}", "--top-k=5", "--json").stdout
    )
    pipe = transformers.pipeline("fill-mask", model=str(roberta_dir), tokenizer=str(roberta_dir), top_k=5)
    theirs = pipe(text)
    assert len(ours["masks"]) == len(theirs) == 2
    for mine, ref in zip(ours["masks"], theirs, strict=True):
        assert [r["token_id"] for r in mine] == [r["token"] for r in ref]
        np.testing.assert_allclose([r["score"] for r in mine], [r["score"] for r in ref], atol=1e-4)


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    """A transformers GPT2LMHeadModel (random, seeded) beside a byte-level BPE trained here."""
    d = tmp_path_factory.mktemp("hf-gpt")
    tok = tokenizers.train_bpe(_texts(), vocab_size=500, special_tokens=tokenizers.GPT2_SPECIALS)
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(d / "hf")
    tok.save(d / "hf")
    return d / "hf"


@pytest.fixture(scope="module")
def gpt_mj(gpt_dir, tmp_path_factory):
    """`maskjax import-hf` of gpt_dir, once for the module."""
    workdir = tmp_path_factory.mktemp("gpt-mj")
    _cli("import-hf", f"--hf-dir={gpt_dir}", f"--out={workdir}")
    return workdir


def test_greedy_generate_of_an_imported_gpt2_gives_transformers_tokens(gpt_dir, gpt_mj):
    workdir = gpt_mj
    prompt = "The module provides"
    ours = json.loads(
        _cli(
            "generate",
            f"--workdir={workdir}",
            f"--prompt={prompt}",
            "--temperature=0",
            "--max-new-tokens=24",
            "--json",
        ).stdout
    )
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt_dir).eval()
    eos = tokenizers.load(gpt_dir).eos_id
    ids = torch.tensor([ours["prompt_ids"]])
    with torch.no_grad():
        ref = model.generate(ids, do_sample=False, max_new_tokens=24, eos_token_id=eos, pad_token_id=eos)
    ref_new = ref[0, ids.shape[1] :].tolist()
    assert ours["new_ids"] == ref_new[: len(ours["new_ids"])] and len(ours["new_ids"]) >= 1
    assert len(ours["new_ids"]) == 24 or ours["new_ids"][-1] == eos
    # The prompt's ids are the tokenizer's; the text is their decoding.
    assert ours["prompt_ids"] == tokenizers.load(gpt_dir).encode(prompt)


@pytest.fixture(scope="module")
def gpt(gpt_mj):
    return infer.load(gpt_mj, ("gpt",))[0]


def test_the_cached_decode_equals_recomputing_every_prefix(gpt):
    """Greedy through the key/value cache == argmax of the full forward over each growing prefix."""
    prompt = [5, 17, 42, 8]
    new = infer.generate(gpt, prompt, max_new_tokens=12, temperature=0.0)
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(jnp.argmax(gpt(jnp.asarray([ids]))["logits"][0, -1])))
    assert new == ids[len(prompt) :]


def test_sampling_is_seeded_and_top_k_1_or_a_tiny_top_p_is_greedy(gpt):
    prompt = [3, 9, 27]
    greedy = infer.generate(gpt, prompt, max_new_tokens=10, temperature=0.0)
    assert infer.generate(gpt, prompt, max_new_tokens=10, temperature=1.0, top_k=1, seed=3) == greedy
    assert infer.generate(gpt, prompt, max_new_tokens=10, temperature=0.7, top_p=1e-6, seed=4) == greedy
    a = infer.generate(gpt, prompt, max_new_tokens=10, temperature=1.0, seed=5)
    assert a == infer.generate(gpt, prompt, max_new_tokens=10, temperature=1.0, seed=5)
    others = {
        tuple(infer.generate(gpt, prompt, max_new_tokens=10, temperature=1.5, seed=s)) for s in range(6)
    }
    assert len(others) > 1


def test_top_k_and_top_p_keep_exactly_the_tokens_they_should():
    logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    keys = jax.random.split(jax.random.key(0), 400)
    top2 = {int(infer._pick(logits, k, 1.0, 2, 1.0)[0]) for k in keys}
    assert top2 == {1, 3}
    # top_p 0.75: 0.4 + 0.3 = 0.7 < 0.75, so the third most likely (0.15) is in, the rest out.
    nucleus = {int(infer._pick(logits, k, 1.0, 0, 0.75)[0]) for k in keys}
    assert nucleus == {1, 3, 4}


def test_generate_compiles_once_whatever_the_number_of_tokens(gpt, caplog):
    """One program per (prompt length, token count): 40 tokens compile no more than 4 do."""

    def compiles(n: int, prompt: list[int]) -> int:
        caplog.clear()
        with caplog.at_level(logging.WARNING), jax.log_compiles():
            infer.generate(gpt, prompt, max_new_tokens=n, temperature=0.0)
        return sum(bool(re.search(r"Compiling .*generate", r.getMessage())) for r in caplog.records)

    assert compiles(4, [1, 2, 3]) == compiles(40, [4, 5, 6]) == 1
    assert compiles(40, [7, 8, 9]) == 0  # same shapes again: no compile at all


def test_generate_refuses_what_the_model_cannot_do(gpt_mj, tmp_path):
    workdir = tmp_path / "mj"
    shutil.copytree(gpt_mj, workdir)  # its tokenizer is moved away below
    for flag, message in (
        ("--max-new-tokens=100", "exceed the model's context of 64"),
        ("--temperature=-1", "--temperature=-1.0 is invalid: must be >= 0"),
        ("--top-p=0", "--top-p=0.0 is invalid: must be in (0, 1]"),
    ):
        result = _cli("generate", f"--workdir={workdir}", "--prompt=The module", flag, ok=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert message in result.stderr.strip().splitlines()[-1], (flag, result.stderr[-500:])
    os.rename(workdir / "tokenizer", workdir / "elsewhere")
    missing = _cli("generate", f"--workdir={workdir}", "--prompt=x", ok=False)
    assert "no tokenizer at" in missing.stderr and "--tokenizer=DIR" in missing.stderr
