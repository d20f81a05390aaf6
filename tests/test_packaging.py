"""Packaging: the folder -> subpackage mapping, torch-free imports, no shadowing of the stdlib."""

import subprocess
import sys
import tomllib

from conftest import REPO

BLOCK_HEAVY = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'torchtitan', 'triton', 'transformers', 'safetensors', 'numpy', 'ray'}:
            raise ImportError(f'{name} is blocked: this package must not need it')
sys.meta_path.insert(0, Block())
"""


def _run(code: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_listed_packages_match_the_folders():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    mapping = pyproject["tool"]["setuptools"]["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for path in [REPO / folder, *(p for p in (REPO / folder).rglob("*") if p.is_dir())]:
            if "__pycache__" not in path.parts and any(path.glob("*.py")):
                rel = path.relative_to(REPO / folder)
                found.add(".".join([package, *rel.parts]))
    assert listed == found, f"pyproject packages differ from folders: missing {found - listed}, extra {listed - found}"


def test_platform_and_operators_import_without_torch():
    code = BLOCK_HEAVY + """
import pkgutil, importlib
import wam.platform, wam.operators
for pkg in (wam.platform, wam.operators):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):
        importlib.import_module(info.name)
from wam.platform.cli import app
print('ok')
"""
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_the_blocker_really_blocks_torch():
    result = _run(BLOCK_HEAVY + "import wam.trainer.model")
    assert result.returncode != 0 and "blocked" in result.stderr


def test_platform_folder_does_not_shadow_the_stdlib_module():
    # Python puts the working directory first on sys.path for `-c`; the repo root must still give the stdlib.
    result = _run("import platform, sys; print(platform.system()); assert 'platform/' not in (platform.__file__ or '')")
    assert result.returncode == 0, result.stderr


def test_wam_cli_help_needs_no_torch():
    result = _run(BLOCK_HEAVY + "import sys; sys.argv = ['wam', '--help']\nfrom wam.platform.cli import main\nmain()")
    assert "model" in result.stdout, result.stderr
