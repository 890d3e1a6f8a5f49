"""The demo configs of every family, shrunk so a train step compiles and runs in seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import ml_collections
import numpy as np

from maskjax import config as config_lib
from maskjax import defaults

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("mae", "bert", "roberta", "gpt", "vqvae", "beit")


# configs/ file of each family the tests shrink: the demos, and the transfer recipes on digits.
CONFIGS = {
    **{family: f"demo/{family}.py" for family in FAMILIES},
    "image_classification": "finetune/demo.py",
    "linear_probe": "probe/demo.py",
    "beit_classification": "finetune/beit_demo.py",
}


def demo(family: str) -> ml_collections.ConfigDict:
    return defaults.from_file(ROOT / "configs" / CONFIGS[family])


def tiny(family: str, data_dir: Path, /, **overrides) -> ml_collections.ConfigDict:
    """`family`'s demo config: 2 layers of width 32, batch 16, a few steps, data under data_dir."""
    c = demo(family)
    c.data.data_dir = str(data_dir)
    c.global_batch_size = 16
    c.total_steps = 6
    c.log_every = 1
    c.eval_every = 3
    c.eval_batches = 1
    c.checkpoint_every = 2
    c.keep_checkpoints = 5
    c.schedule.warmup_steps = 2
    small = dict(hidden=32, layers=2, heads=2, mlp_dim=64)
    if family in ("bert", "roberta", "gpt"):
        c.data.name = f"python_docs_{c.data.layout}32"
        c.data.corpus = str(data_dir / "python-docs")
        c.data.seq_length = 32
        c.data.vocab_size = 600
        c.model.vocab_size = 600
        c.model.max_length = 32 + c.model.get("position_offset", 0)
        if "masking" in c:
            c.masking.max_predictions = 6
    if family == "mae":
        small.update(decoder_hidden=16, decoder_layers=1, decoder_heads=2, decoder_mlp_dim=32)
    if family == "beit":
        c.masking.tokenizer_workdir = str(data_dir / "vqvae")
        c.model.codebook_size = 16
    if family == "vqvae":
        small.update(codebook_size=16, code_dim=8)
    c.model.update(small)
    if "evals" in c:  # tests that want the frozen-feature evaluators turn them on
        for name in ("knn", "ridge"):
            if name in c.evals:
                c.evals[name].every = 0
    return override(c, **overrides)


def override(c: ml_collections.ConfigDict, /, **overrides) -> ml_collections.ConfigDict:
    """`c` with each dotted key ("schedule.epochs") set, as `--config.KEY=VALUE` would set it."""
    return config_lib.override(c, overrides)


def config_file(tmp_path: Path, family: str, data_dir: Path, **overrides) -> Path:
    """A config file for `maskjax train --config=...` that returns tiny(family, data_dir, **overrides)."""
    path = tmp_path / f"{family}_config.py"
    path.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from pathlib import Path\n"
        "from tiny_configs import tiny\n\n"
        "def get_config():\n"
        f"    return tiny({family!r}, Path({str(data_dir)!r}), **{overrides!r})\n"
    )
    return path


def train_command(config: Path, workdir: Path) -> list[str]:
    """`maskjax train` as a user runs it, in a fresh interpreter."""
    return [sys.executable, "-m", "maskjax", "train", f"--config={config}", f"--workdir={workdir}"]


def damage_middle_half(path: Path, rng: np.random.Generator) -> None:
    """Random bytes over the middle half of one file, as a bad disk or an interrupted copy leaves it."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 4)
        f.write(rng.bytes(size // 2))
