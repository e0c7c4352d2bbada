"""The layers point one way (issue #20): the import-linter contracts in
pyproject.toml hold, and the clients load no database library."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

import waystation

ROOT = Path(__file__).resolve().parent.parent
DATABASE_LIBRARIES = ("sqlalchemy", "alembic", "psycopg")


def _lint_imports() -> str:
    found = Path(sys.executable).with_name("lint-imports")
    if found.exists():
        return str(found)
    which = shutil.which("lint-imports")
    assert which, "lint-imports is not installed: pip install -e '.[dev]'"
    return which


def _contracts() -> dict[str, dict[str, Any]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def test_the_import_contracts_hold() -> None:
    # --no-cache: the test leaves no cache directory in the checkout.
    result = subprocess.run(
        [_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=110
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_core_contract_forbids_every_other_module() -> None:
    # A module added at the root is forbidden to core without editing the contract.
    others = {
        f"waystation.{m.name}"
        for m in pkgutil.iter_modules(waystation.__path__)
        if m.name not in ("core", "protocol")
    }
    assert set(_contracts()["core"]["forbidden_modules"]) == others


@pytest.mark.parametrize(
    "module",
    ["waystation.provisioner.daemon", "waystation.runner.agent", "waystation.cli.main"],
)
def test_a_client_loads_no_database_library(module: str) -> None:
    # A fresh interpreter: this one has long since imported the server.
    check = (
        f"import sys, {module}\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {DATABASE_LIBRARIES!r})\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
