"""Evaluators: what a finished run is measured by, kept apart from the masking + model + loss triple.

An evaluator is `evaluate(trainer, params, config, workdir) -> {metric: value}`, run on process 0
after the last step with the trained parameters (host-local). It prints its own line(s) and may
write figures into `workdir`; the loop collects every result of the method's `evaluators` into
`workdir/report.json`. A new evaluator is its own module plus one `REGISTRY` line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# evaluator name -> "module:function"
REGISTRY: dict[str, str] = {
    "mlm_unigram_baseline": "maskjax.evaluators.mlm:unigram_baseline",
    "mae_reconstruction": "maskjax.evaluators.reconstruction:mae_reconstruction",
    "fill_mask_samples": "maskjax.evaluators.samples:fill_mask_samples",
    "greedy_sample_and_perplexity": "maskjax.evaluators.samples:greedy_sample_and_perplexity",
    "top1": "maskjax.evaluators.classification:top1",
    "squad": "maskjax.evaluators.span_qa:squad",
}


def get(name: str) -> Callable[..., dict[str, Any]]:
    if name not in REGISTRY:
        raise ValueError(f"evaluator must be one of {sorted(REGISTRY)}; got {name!r}")
    module, function = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), function)
