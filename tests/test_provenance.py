"""Code versions decide which stages rerun: documentation edits rerun nothing, code edits rerun
the stages whose modules import the edited one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hsat import provenance
from hsat.provenance import code_text, code_version, module_closure

SOURCE = '''"""Module docstring."""
import os  # why os


def f(x):
    """Docstring
    over two lines."""
    # a comment on its own line
    y = "# a hash inside a string is code"  # trailing comment

    return x + 1
'''


def test_code_text_drops_comments_docstrings_and_blank_lines_only():
    text = code_text(SOURCE)
    assert "docstring" not in text.lower() and "comment" not in text
    assert '"# a hash inside a string is code"' in text
    assert code_text(SOURCE.replace("# why os", "# another reason").replace("over two", "across")) == text
    assert code_text(SOURCE.replace("\n\n", "\n").replace("x + 1", "x + 1   ")) == text
    assert code_text(SOURCE.replace("x + 1", "x + 2")) != text
    assert code_text(SOURCE.replace("import os", "import sys")) != text
    # columns of a docstring with non-ASCII characters (the parser counts bytes)
    odd = 'def g():\n    """× — é"""; return "×"\n'
    assert code_text(odd) == 'def g():\n    ; return "×"'


@pytest.fixture
def package_copy(tmp_path, monkeypatch) -> Path:
    """A copy of the hsat sources that provenance reads instead of the installed ones."""
    copy = tmp_path / "hsat"
    shutil.copytree(provenance.SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "SRC", copy)
    provenance._imports.cache_clear()
    yield copy
    provenance._imports.cache_clear()


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))
    provenance._imports.cache_clear()


def test_stage_versions_follow_code_edits_not_documentation_edits(package_copy):
    stages = {"train": ["hsat.cli.train"], "evaluate": ["hsat.cli.evaluate"], "report": ["hsat.cli.report"]}
    before = {s: code_version(e) for s, e in stages.items()}
    mil = package_copy / "evaluate" / "mil.py"
    # mil.py is imported by the evaluation stage (through hsat.evaluate.runs), not by training
    assert mil in module_closure(stages["evaluate"]) and mil not in module_closure(stages["train"])

    _edit(mil, '"""', '"""An edited module docstring. ')
    _edit(mil, "\n\n", "\n\n# a new comment\n\n")
    assert {s: code_version(e) for s, e in stages.items()} == before

    # the hashing module itself is not part of any version (stages import it to stamp their runs)
    _edit(package_copy / "provenance.py", "import ast\n", "import ast  # edited\nimport this_is_unused\n")
    assert {s: code_version(e) for s, e in stages.items()} == before

    _edit(mil, "return rows", "return list(rows)")
    after = {s: code_version(e) for s, e in stages.items()}
    assert after["evaluate"] != before["evaluate"]
    assert after["train"] == before["train"]


def test_schema_defaults_count_and_its_comments_do_not(package_copy):
    entries = ["hsat.cli.train"]
    before = code_version(entries)
    schema = package_copy / "schemas" / "config.schema.yaml"
    schema.write_text(schema.read_text() + "\n# a comment in the schema\n")
    assert code_version(entries) == before
    text = schema.read_text()
    default = next(line for line in text.splitlines() if line.strip().startswith("default: ") and line.strip()[9:].isdigit())
    schema.write_text(text.replace(default, default.rstrip() + "1", 1))
    assert code_version(entries) != before
