"""The README's Python example runs as written and gives the numbers it promises."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0]
    assert len(code.strip().splitlines()) <= 10
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    out = capsys.readouterr().out
    acc = float(re.search(r"robust accuracy ([\d.]+)%", out).group(1))
    assert acc < 5.0  # PGD-40 at eps 0.3 breaks an undefended LeNet-5
    assert ns["result"].cost.gradients < 40 * 1000  # early stopping saved gradients
