"""Issue 15: the package's layout. No module over ~600 lines, no two modules importing each other, and
no import of another subpackage's private modules (tests excepted)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _exists(module: str, root: Path) -> bool:
    path = root.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path, root: Path) -> set[str]:
    """Every st_predict module ``path`` imports, at any depth, except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                for a in child.names:  # "from pkg import submodule" imports the submodule
                    sub = f"{target}.{a.name}"
                    found.add(sub if _exists(sub, root) else target)
            visit(child)

    visit(tree)
    return {m for m in found if m.split(".")[0] == "st_predict"}


def _sources(root: Path) -> list[Path]:
    return sorted((root / "st_predict").rglob("*.py"))


def long_modules(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): n
        for p in _sources(root)
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }


def mutual_imports(root: Path) -> list[tuple[str, str]]:
    # st_predict/__init__ imports its subpackages lazily (module __getattr__), so it is no node here
    top = root / "st_predict" / "__init__.py"
    graph = {_module_name(p, root): _imports(p, root) - {"st_predict"} for p in _sources(root) if p != top}
    return sorted(
        {tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a != b and a in graph.get(b, ())}
    )


def private_imports(root: Path) -> list[str]:
    bad = []
    package = root / "st_predict"
    for path in [*_sources(root), *sorted((root / "benchmarks").glob("*.py"))]:
        own = _module_name(path, root).split(".")[:2] if path.is_relative_to(package) else []
        for module in _imports(path, root):
            parts = module.split(".")
            # st_predict.<sub>._<private>: only <sub> itself may import it
            if len(parts) >= 3 and parts[2].startswith("_") and parts[:2] != own:
                bad.append(f"{path.relative_to(root)} -> {module}")
    return bad


def test_no_module_is_over_600_lines():
    long = long_modules(ROOT)
    assert not long, f"split these by concern (scvi-tools style): {long}"


def test_no_two_modules_import_each_other():
    pairs = mutual_imports(ROOT)
    assert not pairs, f"modules importing each other: {pairs}"


def test_no_private_imports_across_subpackages():
    bad = private_imports(ROOT)
    assert not bad, bad


def test_the_checks_find_each_violation(tmp_path):
    """On a small package written here with one violation of each kind, each check reports exactly it."""
    pkg = tmp_path / "st_predict"
    for sub in ("", "x", "y"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from st_predict import a\n")  # a lazy import still counts
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    (pkg / "x" / "_priv.py").write_text("from . import _own\n")  # a subpackage's own private module: allowed
    (pkg / "x" / "_own.py").write_text("")
    (pkg / "y" / "use.py").write_text("from ..x._priv import thing\n")
    (pkg / "y" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))

    assert mutual_imports(tmp_path) == [("st_predict.a", "st_predict.b")]
    assert private_imports(tmp_path) == ["st_predict/y/use.py -> st_predict.x._priv"]
    assert long_modules(tmp_path) == {"st_predict/y/long.py": MAX_LINES + 1}
