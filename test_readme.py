"""The README's code runs as written: every ```python block of README.md is executed, each in
a fresh namespace, from the repository root (the blocks read files such as testdata/)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parent
BLOCKS = re.findall(r"^```python\n(.*?)^```$", (ROOT / "README.md").read_text(),
                    re.DOTALL | re.MULTILINE)


def test_readme_has_python():
    """The README shows the API as code, so there is something to check."""
    assert BLOCKS


@pytest.mark.slow  # compiles a dozen programs: the API tour, not a property of the model
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, monkeypatch):
    """Block `index` runs without error; its own asserts state what it shows."""
    monkeypatch.chdir(ROOT)
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "readme"})
