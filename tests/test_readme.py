"""The README's masking example runs and prints what its comments promise."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_masking_example_prints_its_comments():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    # The promises: BERT masks "cat" and "mat"; one whole word is 15% of 8 tokens; MAE keeps
    # int(196 · 0.25) = 49 patches; BEiT masks 75 of 196 patches (Bao et al. 2022, Sec. 2.3).
    assert out.getvalue().splitlines() == [
        "[CLS] the [MASK] sat on the [MASK] [SEP]",
        "cat mat",
        "[[1 0]] [[1. 0.]]",
        "(2, 49) 294",
        "[75 75]",
    ]
