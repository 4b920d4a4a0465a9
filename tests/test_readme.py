"""README.md holds exactly two set-up-and-run commands, and CI runs the test one verbatim."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def blocks(text):
    return re.findall(r"<!-- (\w+)-command -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S)


def test_exactly_two_commands_main_and_test():
    found = blocks((ROOT / "README.md").read_text())
    assert [name for name, _ in found] == ["main", "test"]
    for _, cmd in found:
        assert "\n" not in cmd.strip() and cmd.startswith("pip install torch==2.13.0")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci and "bash -c \"$TEST_CMD\"" in ci
    assert "../shared" not in ci
