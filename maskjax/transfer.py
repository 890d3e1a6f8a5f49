"""Label efficiency: what pre-training buys as labels get scarce (BERT's and MAE's premise).

For each share f of the training labels (class-balanced: `data.label_fraction`), one fine-tuning
recipe runs twice, from the pre-trained weights and from scratch, and each ends with top-1 over the
whole held-out split. WORKDIR/{pretrained,scratch}-<f>/ are ordinary train runs (run again, they
resume or, finished, are only evaluated again); label_efficiency.json and .png hold the table and
the figure: top-1 against the share of labels, one curve per start.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

import jax
import ml_collections
from etils import epath

from maskjax import train

ARMS = ("pretrained", "scratch")


def run(
    config: ml_collections.ConfigDict, init: str, workdir: str | os.PathLike, fractions: Sequence[float]
) -> dict:
    """{"fractions": [...], "pretrained": [top-1 ...], "scratch": [...], "figure": path} (process 0)."""
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"fractions": [float(f) for f in fractions], "init": init, **{arm: [] for arm in ARMS}}
    for f in fractions:
        for arm in ARMS:
            c = ml_collections.ConfigDict(config.to_dict())
            c.data.label_fraction = float(f)
            c.init = init if arm == "pretrained" else None
            run_dir = workdir / f"{arm}-{f:g}"
            if jax.process_index() == 0:
                print(f"label efficiency: {arm}, {f:.0%} of the labels -> {run_dir}", flush=True)
            train.train(c, run_dir)
            if jax.process_index() == 0:
                result[arm].append(json.loads((run_dir / "report.json").read_text())["top1"])
    if jax.process_index() != 0:
        return {}
    result["figure"] = str(workdir / "label_efficiency.png")
    _figure(result, config, epath.Path(result["figure"]))
    (workdir / "label_efficiency.json").write_text(json.dumps(result, indent=2))
    print(f"{'labels':>8}  {'pre-trained':>11}  {'scratch':>8}", flush=True)
    for f, p, s in zip(result["fractions"], result["pretrained"], result["scratch"], strict=True):
        print(f"{f:>8.0%}  {p:>11.4f}  {s:>8.4f}", flush=True)
    print(f"figure: {result['figure']}", flush=True)
    return result


def _figure(result: dict, config: ml_collections.ConfigDict, path: epath.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    percent = [100 * f for f in result["fractions"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for arm, label in (("pretrained", "pre-trained (--init)"), ("scratch", "from scratch")):
        ax.plot(percent, result[arm], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xticks(percent, [f"{p:g}%" for p in percent])
    ax.set_xlabel(f"labelled training examples ({config.data.dataset} {config.data.train_split})")
    ax.set_ylabel(f"top-1 ({config.data.eval_split}, all examples)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    path.write_bytes(buffer.getvalue())
