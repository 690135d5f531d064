"""The one-way dependency direction of DESIGN.md, enforced on every import statement (including
imports inside functions, so a lazy import cannot dodge the rule)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hart_train", "data_tools", "tokenizer")
# package -> project packages it must never import
FORBIDDEN = {
    "tokenizer": {"hart_train", "data_tools"},
    "data_tools": {"hart_train"},
    "hart_train": set(),
}
# data_tools may import tokenizer only for the pre-tokenizing encoder
TOKENIZER_ALLOWED_IN_DATA_TOOLS = {"data_tools/encode.py"}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_imports_only_go_down():
    violations = []
    for pkg in PACKAGES:
        files = sorted((ROOT / pkg).rglob("*.py"))
        assert files, f"package {pkg} has no modules"
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            bad = imported_packages(f) & FORBIDDEN[pkg]
            if pkg == "data_tools" and rel not in TOKENIZER_ALLOWED_IN_DATA_TOOLS:
                bad |= imported_packages(f) & {"tokenizer"}
            violations += [f"{rel} imports {b}" for b in sorted(bad)]
    assert not violations, "imports against DESIGN.md's direction:\n" + "\n".join(violations)


def test_schema_is_torch_free():
    assert "torch" not in imported_packages(ROOT / "data_tools" / "schema.py")


def test_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from hart_train import config\n")
    assert "hart_train" in imported_packages(bad)
