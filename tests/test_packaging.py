"""Packaging: the folder -> subpackage mapping, the layers' import contracts, torch-free imports, no shadowing
of the stdlib."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

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
from wam.app.cli import app
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
    result = _run(BLOCK_HEAVY + "import sys; sys.argv = ['wam', '--help']\nfrom wam.app.cli import main\nmain()")
    assert "model" in result.stdout, result.stderr


def test_code_passes_the_linters():
    """`make lint`: ruff, and import-linter's contracts on the layers (pyproject.toml [tool.importlinter])."""
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "app", "platform", "trainer", "operators", "tests",
                           "benchmarks"], capture_output=True, text=True, cwd=REPO)
    assert ruff.returncode == 0, ruff.stdout
    contracts = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], capture_output=True,
                               text=True, cwd=REPO)
    assert contracts.returncode == 0, contracts.stdout + contracts.stderr


# import-linter on a copy of the tree: the installed package's editable finder is taken out, so the copy is
# what Python (and grimp) finds under `wam`.
LINT_COPY = """
import sys
sys.meta_path = [f for f in sys.meta_path if "Editable" not in repr(f)]
sys.path_hooks = [h for h in sys.path_hooks if "Editable" not in repr(h)]
sys.path_importer_cache.clear()
sys.path.insert(0, sys.argv[1])
from importlinter.cli import lint_imports
sys.exit(lint_imports(config_filename=sys.argv[2], no_cache=True))
"""


def _lint_copy(tmp_path: Path, plant: tuple[str, str, str] | None) -> subprocess.CompletedProcess:
    """Copy the code folders to tmp_path/wam/<package>, replace `old` by `new` in `file` if asked, lint."""
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in mapping.items():
        shutil.copytree(REPO / folder, tmp_path / "wam" / package.split(".")[1],
                        ignore=shutil.ignore_patterns("__pycache__"))
    if plant is not None:
        file, old, new = plant
        path = tmp_path / "wam" / file
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new, 1))
    return subprocess.run([sys.executable, "-c", LINT_COPY, str(tmp_path), str(REPO / "pyproject.toml")],
                          capture_output=True, text=True, cwd=tmp_path)


def test_the_import_contracts_catch_lazy_upward_imports(tmp_path):
    kept = _lint_copy(tmp_path / "kept", None)
    assert kept.returncode == 0 and "0 broken" in kept.stdout, kept.stdout + kept.stderr
    # a core module importing the trainer inside a function
    upward = _lint_copy(tmp_path / "upward", ("platform/errors.py", "class UserError",
                                              "def _planted():\n    from wam.trainer import flow  # noqa: F401\n\n\n"
                                              "class UserError"))
    assert upward.returncode == 1 and "wam.platform.errors -> wam.trainer.flow" in upward.stdout, upward.stdout
    # the operator importing the trainer inside a function
    sideways = _lint_copy(tmp_path / "sideways", ("operators/kube.py", "class Kube:",
                                                  "def _planted():\n    import wam.trainer.flow  # noqa: F401\n\n\n"
                                                  "class Kube:"))
    assert sideways.returncode == 1 and "wam.operators.kube -> wam.trainer.flow" in sideways.stdout, sideways.stdout
