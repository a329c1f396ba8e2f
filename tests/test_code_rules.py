"""The codebase's own rules, read from its source with `ast` (docs/DESIGN.md §2).

- No import cycle in xlearner/: every import counts, a function-level one too (a lazy import that dodges a
  cycle is still the cycle).
- No function over 60 lines (docstring included): each one reads at once. The training loop, engine.train, may
  take up to 100: it reads top to bottom, as one loop.
- A `module.Name` in a docstring or comment names something defined in that module.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "xlearner"
MAX_FUNCTION_LINES = 60
LOOP, MAX_LOOP_LINES = ("xlearner/engine.py", "train"), 100


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The xlearner modules that `path` imports, anywhere in the file."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]  # `from . import data` names a module
        else:
            continue
        found |= {n for n in names if n in modules and n != here}
    return found


def unresolved_imports() -> list[str]:
    """Relative imports that name no module of the package, nor a name its __init__ defines: an import that only
    works where another checkout of xlearner is installed."""
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    init_names = {_module_name(p): _defined(p) for p in files if p.name == "__init__.py"}
    bad = []
    for path in files:
        here = _module_name(path)
        package = here if path.name == "__init__.py" else here.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:
                if base not in modules:
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {base}")
                elif f"{base}.{a.name}" not in modules and base in init_names and a.name not in init_names[base] \
                        and not (PACKAGE.parent / base.replace(".", "/") / f"{a.name}.py").exists():
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {base}.{a.name}")
    return bad


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _imports(p, modules) for p in files}
    # a package's __init__ runs before its modules: importing xlearner.tools.x imports xlearner.tools
    return {m: deps - {m.rpartition(".")[0]} for m, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                loop = (path.relative_to(PACKAGE.parent).as_posix(), node.name) == LOOP
                if n > (MAX_LOOP_LINES if loop else limit):
                    out.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_are_read_from_function_bodies(tmp_path, monkeypatch):
    pkg = tmp_path / "xlearner"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    assert find_cycle(import_graph()) == ["xlearner.a", "xlearner.b", "xlearner.a"]


def test_no_import_cycle_in_xlearner():
    assert find_cycle(import_graph()) is None


def test_every_relative_import_names_a_module_of_the_package():
    assert unresolved_imports() == []


def test_no_function_over_60_lines_but_the_loop():
    assert long_functions() == []
    assert long_functions(limit=20) and not any(f.startswith("xlearner/engine.py") and " train (" in f
                                                 for f in long_functions(limit=20))  # the loop's own bar: 100


# ----------------------------------------------------------------------------
# pointers in docstrings and comments: `module.Name` names something defined in that module

POINTER = r"(?<![\w./`-])`?({mods})\.([A-Za-z_]\w*)"


def _defined(path: Path) -> set[str]:
    """Top-level names of a module: functions, classes, assignments, and the names it imports."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every docstring and comment of a file."""
    import io
    import tokenize
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.COMMENT or (tok.type == tokenize.STRING and tok.string.startswith(('"""', "'''"))):
            out.append((tok.start[0], tok.string))
    return out


RETIRED = ("reconcile", "datasets")  # modules that moved (model.py, formats/files.py): any pointer to them is stale
FILE_SUFFIXES = {"py", "pt", "pth", "json", "jsonl", "md", "toml", "png", "txt"}  # `checkpoint.pt`, `results.md`
VARIABLES = {"model", "run"}  # also the usual names of objects (`model.predict`, `run.tc`): only CapWords checked


def stale_pointers() -> list[str]:
    """`module.Name` in a docstring or comment, where module is an xlearner module (by its last name) and Name is
    neither defined there nor a key of the config section of the same name (`model.arch`, `squeeze.steps`)."""
    import re
    import dataclasses
    from xlearner import config
    from xlearner.tools.ablate_config import AblateConfig
    files = {p.stem if p.name != "__init__.py" else p.parent.name: p for p in PACKAGE.rglob("*.py")}
    sections = {"model": config.ModelConfig, "expand": config.TrainConfig, "squeeze": config.SqueezeConfig,
                "transfer": config.TransferConfig, "ablate": AblateConfig}
    keys = {s: {f.name for f in dataclasses.fields(c)} for s, c in sections.items()}
    defined = {m: _defined(p) for m, p in files.items()}
    defined["xlearner"] |= {p.name for p in PACKAGE.iterdir() if p.is_dir()} | {p.stem for p in PACKAGE.glob("*.py")}
    defined["run"] |= {p.stem for p in (PACKAGE / "run").glob("*.py")}
    pattern = re.compile(POINTER.format(mods="|".join(sorted([*files, *RETIRED], key=len, reverse=True))))
    stale = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, text in _texts(path):
            for m in pattern.finditer(text):
                module, name = m.groups()
                if module in VARIABLES and not name[0].isupper() or name in FILE_SUFFIXES:
                    continue
                if name not in defined.get(module, ()) and name not in keys.get(module, ()):
                    stale.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module}.{name}")
    return stale


def test_docstring_pointers_name_what_is_defined_there():
    assert stale_pointers() == []


ENTRY_POINTS = {"run", "main"}  # every stage has its run(cfg), every program its main: one name, one role


def names_defined_twice() -> dict[str, list[str]]:
    """Public top-level names defined in more than one module (a stage's `run` and a program's `main` aside)."""
    homes: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in _defined(path):
            if not name.startswith("_") and name not in ENTRY_POINTS:
                homes.setdefault(name, []).append(str(path.relative_to(PACKAGE.parent)))
    return {n: paths for n, paths in homes.items() if len(paths) > 1}


def test_no_public_name_is_defined_twice():
    assert names_defined_twice() == {}
