"""`ruff check` (configured in pyproject.toml: line length 120, pycodestyle E/W and pyflakes F) finds nothing in
the repository. ruff is in setup.py's `test` extra; the test skips only where it is not installed (and fails
there under CI)."""
import importlib.util
import os
import shutil
import subprocess
import sys

from helpers import not_installed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ruff_command():
    exe = shutil.which("ruff")
    if exe:
        return [exe]
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    return None


def test_ruff_check_finds_nothing():
    cmd = ruff_command()
    if cmd is None:
        not_installed("ruff (setup.py's test extra: pip install -e '.[test]')")
    # --no-cache: no .ruff_cache left in the checkout; the configuration is pyproject.toml's, found from ROOT
    out = subprocess.run([*cmd, "check", "--no-cache", "--output-format", "concise", "."],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"ruff check found problems (exit {out.returncode}):\n{out.stdout}{out.stderr}"
