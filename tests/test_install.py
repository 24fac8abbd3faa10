"""The README's two commands, in order, in a new virtual environment, as a new user runs them: install
and train, then the editable install with the test extra, then `lstmkit sample` on the run.

The first command once left Numba's compiled kernels in site-packages/lstmkit/__pycache__; the second
removed the package but not that folder, which then shadowed the editable install as an empty
namespace package and broke every subcommand. The venv sees the machine's packages
(--system-site-packages) so that NumPy, Numba and torch are not downloaded again; lstmkit itself is
installed into the venv, from a copy of the checkout (pip builds in the source folder).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer.\n" * 20


def _sh(cmd, cwd, env, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, shell=True)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _copy_checkout(dest):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the checkout's files")
def test_readme_commands_in_order_in_a_new_venv(tmp_path):
    src, venv = tmp_path / "src", tmp_path / "venv"
    src.mkdir()
    _copy_checkout(src)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(venv),
               LSTMKIT_CACHE_DIR=str(tmp_path / "cache"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    small = "--data ../text.txt --out ../run --hidden-size 16 --batch-size 4 --seq-len 16 --steps 3 --no-progress"

    # 1. `python3 -m pip install . && lstmkit train` (a short run instead of the 8-minute main job)
    _sh(f"python -m pip install -q . && lstmkit train {small}", src, env)
    site = Path(_sh("python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])'", src, env).strip())
    installed = site / "lstmkit"
    assert (installed / "kernels.py").is_file()
    compiled = [p.name for p in installed.rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert compiled == [], f"Numba wrote into the installed package: {compiled}"
    assert any((tmp_path / "cache").rglob("*.nbi")), "the kernels were not cached in LSTMKIT_CACHE_DIR"

    # 2. `python3 -m pip install -e ".[test]"` (torch is already on the machine: nothing is downloaded)
    _sh('python -m pip install -q -e ".[test]"', src, env)
    where = _sh("python -c 'import lstmkit, os; print(os.path.dirname(lstmkit.__file__))'", tmp_path, env).strip()
    assert Path(where) == src / "lstmkit"

    # 3. the CLI works on the run the first command made
    out = _sh("lstmkit sample ../run --length 20 --seed 1", src, env)
    assert len(out) == 20 + 1                          # 20 characters and the newline
    assert _sh("lstmkit --version", src, env).strip().startswith("lstmkit ")
