"""The README's Python examples run as written, in order, in one namespace."""

from __future__ import annotations

import os
import re

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", open(README, encoding="utf-8").read(), flags=re.S)


def test_readme_has_examples():
    blocks = python_blocks()
    assert len(blocks) >= 3
    assert any("from_softmax_pretrained" in b for b in blocks) and any(".generate(" in b for b in blocks)


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md[python block {i}]", "exec"), namespace)
        except Exception as err:  # name the block that failed
            raise AssertionError(f"README python block {i} failed: {err!r}\n{block}") from err
    assert (tmp_path / "smollm2-t2r" / "config.json").exists()
