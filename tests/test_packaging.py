"""Packaging: every imported distribution is declared, the console commands run, and the wheel works alone.

The wheel test builds from a copy of the sources in a temporary folder (nothing is written into the
repository), offline (``--no-isolation``: the setuptools of this environment), installs the wheel with
``--no-deps`` into a fresh venv that sees this environment's site-packages through a ``.pth`` line (the
dependencies, not this checkout), and imports every module from there.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from support import REPOSITORY

import lightning_optloss

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PACKAGE = REPOSITORY / "lightning_optloss"
COMMANDS = ["optloss-demo", "optloss-compare", "optloss-replay"]


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared() -> tuple[set[str], set[str]]:
    """The distributions pyproject.toml declares: (dependencies, those of every extra)."""
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    extras = {requirement_name(r) for group in project["optional-dependencies"].values() for r in group}
    return core, extras


def third_party_imports() -> dict[str, bool]:
    """Top-level names the package imports from outside itself and the standard library: name -> at module level."""
    found: dict[str, bool] = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        module_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "lightning_optloss":
                    continue
                found[top] = found.get(top, False) or id(node) in module_level
    return found


@functools.cache
def installed_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # reads every installed RECORD: once


def distributions_of(import_name: str) -> set[str]:
    names = installed_distributions().get(import_name, [])
    return {name.lower().replace("_", "-") for name in names}


def test_every_imported_package_is_declared() -> None:
    core, extras = declared()
    imports = third_party_imports()
    assert {"torch", "lightning", "mlflow", "PIL"} <= set(imports)
    undeclared, optional_at_import = [], []
    for name, module_level in sorted(imports.items()):
        distributions = distributions_of(name)
        assert distributions, f"{name!r} is imported but installed by no distribution here"
        if not distributions & (core | extras):
            undeclared.append(f"{name} ({', '.join(sorted(distributions))})")
        elif module_level and not distributions & core:
            optional_at_import.append(name)
    assert not undeclared, f"imported by lightning_optloss but not declared in pyproject.toml: {undeclared}"
    assert not optional_at_import, (
        f"imported at module level but only in an extra (import them inside the function that needs them, "
        f"or declare them in dependencies): {optional_at_import}"
    )


def script(name: str) -> Path:
    return Path(sysconfig.get_path("scripts")) / name


# Each command imports torch, Lightning and MLflow (seconds): one in the default suite, the others with the slow tests.
@pytest.mark.parametrize(
    "command", [pytest.param(c, marks=[] if c == "optloss-compare" else [pytest.mark.slow]) for c in COMMANDS]
)
def test_console_commands_answer_help(command: str) -> None:
    path = script(command)
    assert path.exists(), f"{path} is missing: reinstall the package (make venv, or pip install -e .)"
    result = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: "), result.stdout
    assert "--tracking-uri" in result.stdout or command == "optloss-demo"


@pytest.mark.slow
def test_demo_command_trains_and_exits_with_status_zero(tmp_path: Path) -> None:
    # The console wrapper must not hand the demo's result dict to sys.exit (which prints it and exits 1).
    store = tmp_path / "store"
    result = subprocess.run(
        [str(script("optloss-demo")), "--store", str(store), "--epochs", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "validation accuracy" in result.stdout
    assert (store / "mlflow.db").exists()


def subpackages() -> set[str]:
    return {
        info.name
        for info in pkgutil.walk_packages(lightning_optloss.__path__, prefix="lightning_optloss.")
        if info.ispkg
    } | {"lightning_optloss"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPOSITORY / name, source / name)
    shutil.copytree(PACKAGE, source / "lightning_optloss", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [built] = dist.glob("lightning_optloss-*.whl")
    return built


@pytest.mark.slow
def test_wheel_holds_every_subpackage_and_the_commands(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        commands = archive.read(entry_points).decode()
        requires = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    packaged = {name.rsplit("/", 1)[0].replace("/", ".") for name in names if name.endswith("/__init__.py")}
    assert packaged == subpackages()
    modules = {name for name in names if name.endswith(".py")}
    assert {str(p.relative_to(REPOSITORY)) for p in PACKAGE.rglob("*.py")} == modules
    assert not [name for name in names if name.startswith(("tests/", "recipes/", "benchmarks/"))]
    for command in COMMANDS:
        assert f"{command} = " in commands
    assert "Requires-Dist: pillow" in requires


@pytest.mark.slow
def test_wheel_installs_and_imports_in_a_clean_venv(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    # The dependencies come from this environment's site-packages, appended after the venv's own: the package is
    # found in the venv first, and this checkout's editable install (a .pth there) is not processed.
    site_packages = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    (site_packages / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    check = (
        "import importlib, pkgutil, lightning_optloss as package\n"
        "names = [i.name for i in pkgutil.walk_packages(package.__path__, 'lightning_optloss.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(package.__file__, len(names), package.OptimizeLoss.__name__)\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [str(python), "-c", check], capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr
    location, count, name = result.stdout.split()
    assert Path(location).is_relative_to(venv), f"imported from {location}, not from the installed wheel"
    assert int(count) == len(list(PACKAGE.rglob("*.py"))) - 1  # every module but the package's own __init__
    assert name == "OptimizeLoss"
    helped = subprocess.run(
        [str(venv / "bin" / "optloss-replay"), "--help"], capture_output=True, text=True, env=environment, timeout=180
    )
    assert helped.returncode == 0 and "PATH [PATH ...]" in helped.stdout, helped.stderr
