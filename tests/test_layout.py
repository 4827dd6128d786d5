"""The package's layout (issues 15 and 27). No module over ~600 lines, no two modules importing each other,
no import of another package's private modules, the root included (tests excepted), and at most six modules
at the top."""

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


def _owner(module: str, root: Path) -> str | None:
    """The package a private module belongs to: ``st_predict.model._nh2st`` -> ``st_predict.model``,
    ``st_predict._utils._atomic`` -> ``st_predict._utils``, ``st_predict._x`` -> ``st_predict``. ``None`` for a
    public path, and for a private *package* itself (``st_predict._utils``): its ``__init__`` is its interface."""
    parts = module.split(".")
    for i in range(1, len(parts)):
        if parts[i].startswith("_"):
            if (root.joinpath(*parts[: i + 1]) / "__init__.py").is_file():
                if i == len(parts) - 1:
                    return None
                continue
            return ".".join(parts[:i])
    return None


def private_imports(root: Path) -> list[str]:
    """Imports of a private module from outside the package that owns it. The root is a package like any
    other: its private modules are its own, so a subpackage may import ``st_predict._utils`` (a package)
    but not ``st_predict._utils._atomic``, nor a private module at the root."""
    bad = []
    package = root / "st_predict"
    for path in [*_sources(root), *sorted((root / "benchmarks").glob("*.py"))]:
        here = None
        if path.is_relative_to(package):
            name = _module_name(path, root)
            here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for module in _imports(path, root):
            owner = _owner(module, root)
            if owner is None:
                continue
            inside = here is not None and (here == owner or (owner != "st_predict" and here.startswith(owner + ".")))
            if not inside:
                bad.append(f"{path.relative_to(root)} -> {module}")
    return bad


def top_level_modules(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "st_predict").glob("*.py"))


def test_no_module_is_over_600_lines():
    long = long_modules(ROOT)
    assert not long, f"split these by concern (scvi-tools style): {long}"


def test_no_two_modules_import_each_other():
    pairs = mutual_imports(ROOT)
    assert not pairs, f"modules importing each other: {pairs}"


def test_no_private_imports_across_subpackages():
    bad = private_imports(ROOT)
    assert not bad, bad


def test_few_modules_sit_at_the_top():
    """The architecture shows in the subpackages (scvi-tools has about five top-level modules)."""
    top = top_level_modules(ROOT)
    assert len(top) <= 6, top


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
    (pkg / "_root.py").write_text("from ._top import z\n")  # the root's own private module: allowed
    (pkg / "_top.py").write_text("")
    (pkg / "_utils").mkdir()
    (pkg / "_utils" / "__init__.py").write_text("from ._inner import w\n")
    (pkg / "_utils" / "_inner.py").write_text("")
    (pkg / "x" / "root.py").write_text("from st_predict import _top\nfrom st_predict._utils import w\n")
    (pkg / "x" / "deep.py").write_text("from st_predict._utils._inner import w\n")

    assert mutual_imports(tmp_path) == [("st_predict.a", "st_predict.b")]
    # a subpackage importing the root's private module or a private package's module; the package itself is fine
    assert private_imports(tmp_path) == ["st_predict/x/deep.py -> st_predict._utils._inner",
                                         "st_predict/x/root.py -> st_predict._top",
                                         "st_predict/y/use.py -> st_predict.x._priv"]
    assert long_modules(tmp_path) == {"st_predict/y/long.py": MAX_LINES + 1}
    assert top_level_modules(tmp_path) == ["__init__.py", "_root.py", "_top.py", "a.py", "b.py", "c.py"]
