"""The package layering of docs/ARCHITECTURE.md, enforced: import-linter's contracts (in
pyproject.toml) hold for the code, and they do catch a forbidden import; module names are unique."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # analyse this tree, not an installed copy
    return subprocess.run([str(LINT), str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    proc = _lint(REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def test_import_contracts_catch_forbidden_imports(tmp_path):
    """DeepSpeed imported by the model, and the engine imported by the checkpoint package,
    each break a contract."""
    shutil.copytree(REPO / "megallama", tmp_path / "megallama",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "megallama/model/llama.py", "a") as f:
        f.write("\nimport deepspeed  # noqa: E402,F401\n")
    with open(tmp_path / "megallama/checkpoint/weights.py", "a") as f:
        f.write("\nimport megallama.engine  # noqa: E402,F401\n")
    with open(tmp_path / "megallama/checkpoint/state.py", "a") as f:  # interop is above checkpoint
        f.write("\nimport megallama.interop.hf  # noqa: E402,F401\n")
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert "Only megallama.engine imports DeepSpeed BROKEN" in proc.stdout, proc.stdout[-4000:]
    assert "megallama.model.llama -> deepspeed" in proc.stdout
    assert "megallama.checkpoint.weights -> megallama.engine" in proc.stdout
    assert "megallama.checkpoint.state -> megallama.interop.hf" in proc.stdout


# modules kept at an old import path after their code moved: each only re-exports its namesake
MOVED = {"checkpoint/convert.py": "megallama.interop.convert"}


def test_module_names_are_unique():
    """No two modules of the package share a name (``config.py`` and ``engine/config.py`` did),
    except the old import paths of moved modules, which only re-export them."""
    root = REPO / "megallama"
    names = Counter(p.stem for p in root.rglob("*.py")
                    if p.stem != "__init__" and p.relative_to(root).as_posix() not in MOVED)
    packages = {p.name for p in (REPO / "megallama").iterdir() if p.is_dir()}
    clashes = {n for n, c in names.items() if c > 1} | (set(names) & packages)
    assert not clashes, sorted(clashes)


def test_moved_modules_only_re_export():
    """An old import path names the same objects as the new one and holds no code of its own."""
    import importlib

    for rel, target in MOVED.items():
        old = importlib.import_module("megallama." + rel[:-3].replace("/", "."))
        new = importlib.import_module(target)
        assert old.__all__ and all(getattr(old, n) is getattr(new, n) for n in old.__all__)
        code = (REPO / "megallama" / rel).read_text()
        assert "def " not in code and "class " not in code, rel
