"""The README's quick start runs as written."""
import pathlib
import re


def test_quick_start_runs(capsys):
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## Quick start\s+```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "README quick start", "exec"), {})
    assert "tensor(" in capsys.readouterr().out
