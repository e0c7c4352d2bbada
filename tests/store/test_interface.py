"""The store is the only way to the database, and every verb is tested.

- Nothing in `src/waystation` outside `store/` imports `waystation.store.database`
  or reaches a database handle (`.db`, `._db`): they call `Store` verbs.
- Every public method of `Store` has a one-line docstring and is named in
  this conformance suite (`tests/store/`), so a new verb without a test fails.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from waystation.store import Store

SRC = Path(__file__).resolve().parents[2] / "src" / "waystation"
SUITE = Path(__file__).resolve().parent
# Blocking verbs and lifecycle: exercised by the fixtures and this file.
NOT_VERBS = {"open", "close", "url", "dialect", "reads_inline"}


def _outside_store() -> list[Path]:
    store = SRC / "store"
    protocol = SRC / "protocol"
    return [
        p for p in sorted(SRC.rglob("*.py")) if store not in p.parents and protocol not in p.parents
    ]


def test_nothing_outside_the_store_reaches_the_database() -> None:
    found = []
    for path in _outside_store():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(SRC)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom) and node.module is not None:
                names = {f"{node.module}.{a.name}" for a in node.names} | {node.module}
                if "waystation.store.database" in names:
                    found.append(f"{where} imports waystation.store.database")
            elif isinstance(node, ast.Import):
                if any(a.name.startswith("waystation.store.database") for a in node.names):
                    found.append(f"{where} imports waystation.store.database")
            elif isinstance(node, ast.Attribute) and node.attr in ("db", "_db"):
                found.append(f"{where} uses .{node.attr}")
    assert found == []


def _verbs() -> list[str]:
    return sorted(
        name
        for name, member in inspect.getmembers(Store)
        if not name.startswith("_") and name not in NOT_VERBS and callable(member)
    )


def test_every_verb_has_a_one_line_docstring() -> None:
    missing = [
        name
        for name in _verbs()
        if not (doc := getattr(Store, name).__doc__) or "\n" in doc.strip()
    ]
    assert missing == []


def test_every_verb_is_in_the_conformance_suite() -> None:
    suite = "".join(p.read_text() for p in SUITE.glob("test_*.py") if p.name != "test_interface.py")
    # Called, or handed to a thread (`asyncio.to_thread(store.key_rotate_now, ...)`).
    untested = [name for name in _verbs() if not re.search(rf"\.{name}\b", suite)]
    assert untested == []
