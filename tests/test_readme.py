"""The README's first two lines of code are the contract with a new user; CI must run the second."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("```bash")
    return lines[start + 1], lines[start + 2], lines[start + 3]


def test_readme_starts_with_the_two_commands():
    run_main, run_tests, fence = readme_commands()
    assert fence == "```", "exactly two commands open the README"
    assert run_main.endswith("lstmkit train")
    assert "pytest" in run_tests and ".[test]" in run_tests


def test_ci_runs_the_readme_test_command_verbatim():
    _, run_tests, _ = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert run_tests in ci
