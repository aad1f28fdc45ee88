"""README.md stays true: its configuration tables and its commands."""

from pathlib import Path

import pytest

from jcl_k8s.config import reference

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("command", ["pretrain", "lincls"])
def test_readme_documents_every_setting_with_its_default(command):
    text = README.read_text()
    for key, default, doc in reference(command):
        assert f"| `{key}` | `{default}` | {doc} |" in text, f"README lacks {command} {key}"


def test_every_setting_has_a_one_line_doc():
    for command in ("pretrain", "lincls"):
        assert all(doc for _key, _default, doc in reference(command))


def test_readme_test_command_is_the_one_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python3 -m pytest -q" in README.read_text()
    assert ci.strip().splitlines()[-1] == "python3 -m pytest -q"
