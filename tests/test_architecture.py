"""The package's layering, checked by reading its source with ``ast`` (nothing is imported).

Every ``import x`` and ``from x import y`` counts, at any depth (inside functions too). Each rule
is one test whose failure message lists every offending ``module -> imported module`` pair, and
the size limits list every offender as ``file:line`` with its length. The checker is a handful of
small functions below; the ``*_bites`` tests feed it synthetic source so that it is known to be
able to fail.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dvector"
PACKAGE_DIR = ROOT / PACKAGE

MAX_TOP_LEVEL_MODULES = 8
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 120
EXPLAIN_FUNCTION_LINES = 80  # longer than this: the docstring must say "Long because <reason>"
LONG_BECAUSE = re.compile(r"Long because\W*\w")

# ---------------------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to an absolute dotted module name."""

    importer: str  # e.g. "dvector.signal.audio"
    imported: str  # e.g. "dvector.errors"
    line: int
    in_function: bool  # inside a def/async def (a lazy import), at any depth

    def __str__(self) -> str:
        lazy = " (in a function)" if self.in_function else ""
        return f"{self.importer} -> {self.imported}  [line {self.line}{lazy}]"


def module_name(path: Path, root: Path = ROOT) -> tuple[str, bool]:
    """``dvector/signal/audio.py`` -> ("dvector.signal.audio", False); an ``__init__.py`` -> (package, True)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def resolve_from(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of ``from <'.' * level><module> import ...`` written in ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level - 1 > len(base):
        raise ValueError(f"{importer}: relative import beyond the top-level package")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_in_source(
    source: str, importer: str, is_package: bool = False, known_modules: Iterable[str] = (), filename: str = "<src>"
) -> list[Import]:
    """Every import in ``source`` (at any depth). ``from pkg import name`` counts as importing
    ``pkg.name`` when that is one of ``known_modules`` (a submodule), else as importing ``pkg``."""
    known = set(known_modules)
    tree = ast.parse(source, filename=filename)
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(importer, alias.name, node.lineno, in_function))
        elif isinstance(node, ast.ImportFrom):
            target = resolve_from(importer, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.append(Import(importer, sub if sub in known else target, node.lineno, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    # "from x import a, b" is one dependency, not two
    unique: dict[tuple[str, str, int], Import] = {}
    for imp in found:
        unique.setdefault((imp.importer, imp.imported, imp.line), imp)
    return list(unique.values())


def package_files(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    return sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)


def all_imports(package_dir: Path = PACKAGE_DIR) -> list[Import]:
    files = package_files(package_dir)
    root = package_dir.parent
    known = {module_name(p, root)[0] for p in files}
    result: list[Import] = []
    for path in files:
        name, is_package = module_name(path, root)
        result += imports_in_source(path.read_text(encoding="utf-8"), name, is_package, known, str(path))
    return result


def within(name: str, prefix: str) -> bool:
    """``name`` is module ``prefix`` or inside it."""
    return name == prefix or name.startswith(prefix + ".")


def sub(name: str) -> str:
    return f"{PACKAGE}.{name}"


def forbidden_imports(
    imports: Iterable[Import], importer_in: str, forbidden: Iterable[str], allowed: Iterable[str] = ()
) -> list[Import]:
    """Imports made by modules inside ``importer_in`` of modules inside any of ``forbidden``,
    unless the imported module is inside one of ``allowed``."""
    forbidden, allowed = list(forbidden), list(allowed)
    return [
        imp
        for imp in imports
        if within(imp.importer, importer_in)
        and any(within(imp.imported, f) for f in forbidden)
        and not any(within(imp.imported, a) for a in allowed)
    ]


def is_top_level_module(name: str, subpackage_names: Iterable[str]) -> bool:
    """``dvector.config`` and friends: a module file directly in ``dvector/`` (not a sub-package)."""
    parts = name.split(".")
    return len(parts) == 2 and parts[0] == PACKAGE and parts[1] not in set(subpackage_names)


def subpackages(package_dir: Path = PACKAGE_DIR) -> list[str]:
    return sorted(
        p.name for p in package_dir.iterdir() if p.is_dir() and p.name != "__pycache__" and any(p.rglob("*.py"))
    )


def top_level_leaf_violations(imports: Iterable[Import], subpackage_names: Iterable[str]) -> list[Import]:
    """Modules directly in ``dvector/`` (but ``__init__`` and ``__main__``) import no sub-package
    and not the package itself, only each other."""
    subpackage_names = list(subpackage_names)
    names = [sub(s) for s in subpackage_names]
    return [
        imp
        for imp in imports
        if is_top_level_module(imp.importer, subpackage_names)
        and imp.importer not in (sub("__init__"), sub("__main__"))
        and (imp.imported == PACKAGE or any(within(imp.imported, s) for s in names))
    ]


def package_init_violations(imports: Iterable[Import], subpackage_names: Iterable[str]) -> list[Import]:
    """``dvector/__init__.py`` imports only top-level modules eagerly, and only ``dvector.inference`` lazily."""
    names = [sub(s) for s in subpackage_names]
    bad = []
    for imp in imports:
        if imp.importer != PACKAGE:
            continue
        if any(within(imp.imported, s) for s in names):
            if not (within(imp.imported, sub("inference")) and imp.in_function):
                bad.append(imp)
    return bad


def cli_importers(imports: Iterable[Import]) -> list[Import]:
    """Only ``dvector.__main__`` and ``dvector.cli.*`` may import ``dvector.cli``."""
    return [
        imp
        for imp in imports
        if within(imp.imported, sub("cli")) and imp.importer != sub("__main__") and not within(imp.importer, sub("cli"))
    ]


def package_face_importers(imports: Iterable[Import]) -> list[Import]:
    """Imports of ``dvector`` itself (its ``__init__``) outside ``cli`` and ``demo``."""
    return [
        imp
        for imp in imports
        if imp.imported == PACKAGE and not within(imp.importer, sub("cli")) and not within(imp.importer, sub("demo"))
    ]


def import_loops(imports: Iterable[Import], package: str = PACKAGE) -> list[list[str]]:
    """The package's import loops: each group of modules that reach each other through imports
    (a strongly connected component of more than one module, or a module importing itself), as one
    loop through them ``[a, b, ..., a]``, found by Tarjan's algorithm over every import at any depth."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if within(imp.importer, package) and within(imp.imported, package):
            graph.setdefault(imp.importer, set()).add(imp.imported)
            graph.setdefault(imp.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1 or node in graph[node]:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [loop_through(group, graph) for group in sorted(groups)]


def loop_through(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One path ``[a, ..., a]`` inside ``group`` (modules that all reach each other), from its first module."""
    members, start = set(group), group[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest loop back to start
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return group


@dataclass(frozen=True)
class LongThing:
    where: str  # file:line
    name: str
    lines: int
    why: str

    def __str__(self) -> str:
        return f"{self.where}  {self.name}: {self.lines} lines ({self.why})"


def long_functions(
    source: str, filename: str, max_lines: int = MAX_FUNCTION_LINES, explain_lines: int = EXPLAIN_FUNCTION_LINES
) -> list[LongThing]:
    """Functions (methods and nested ones too) over ``max_lines``, and those over ``explain_lines``
    without "Long because <reason>" in their docstring. Length: end_lineno - lineno + 1, where
    lineno is the ``def`` line (decorators are not counted)."""
    bad = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
        where = f"{filename}:{node.lineno}"
        if length > max_lines:
            bad.append(LongThing(where, node.name, length, f"over {max_lines}"))
        elif length > explain_lines and not LONG_BECAUSE.search(ast.get_docstring(node) or ""):
            bad.append(LongThing(where, node.name, length, f"over {explain_lines} without 'Long because ...' in its docstring"))
    return bad


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def report(title: str, offenders: Iterable[object]) -> str:
    lines = [str(o) for o in offenders]
    return f"{title} ({len(lines)}):\n  " + "\n  ".join(lines)


def fail_if(title: str, offenders: list) -> None:
    """Fail with just the list of offenders (no traceback of the checker)."""
    if offenders:
        pytest.fail(report(title, offenders), pytrace=False)


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return all_imports()


# ---------------------------------------------------------------------------------------------
# Layering rules between the sub-packages
# ---------------------------------------------------------------------------------------------

# The four parts that put a trained model to use, in the order they may import each other.
USE_PARTS = ["inference", "evaluation", "export", "diarization"]

LAYER_RULES: dict[str, tuple[list[str], list[str]]] = {
    # importer package: (forbidden, allowed exceptions inside the forbidden ones)
    "corpus": (["signal", "augment", "shards", "stream", "nn", "training", *USE_PARTS, "pretrained", "cli", "demo"],
               []),
    "signal": (["augment", "shards", "stream", "nn", "training", *USE_PARTS, "cli", "demo"], []),
    "augment": (["shards", "stream", "nn", "training", *USE_PARTS, "cli", "demo"], []),
    "nn": (["signal", "augment", "shards", "stream", "training", *USE_PARTS, "cli", "demo"], []),
    "shards": (["augment", "stream", "nn", "training", *USE_PARTS, "cli", "demo"], []),
    "stream": (["nn", "training", *USE_PARTS, "cli", "demo"], []),
    "training": (["shards", *USE_PARTS, "cli", "demo"], []),
    "inference": (["augment", "stream", "training", "evaluation", "export", "diarization", "cli", "demo"],
                  ["training.checkpoint"]),
    "evaluation": (["augment", "stream", "training", "export", "diarization", "cli", "demo"], []),
    "export": (["augment", "stream", "training", "inference", "evaluation", "diarization", "cli", "demo"],
               ["training.checkpoint", "inference.bundle"]),
    "diarization": (["augment", "stream", "training", "shards", "export", "evaluation", "cli", "demo"],
                    ["evaluation.results"]),
    "pretrained": (["signal", "augment", "shards", "stream", "training", *USE_PARTS, "cli", "demo"],
                   ["training.checkpoint"]),
}


def check_layer(imports: list[Import], part: str) -> list[Import]:
    forbidden, allowed = LAYER_RULES[part]
    return forbidden_imports(imports, sub(part), [sub(f) for f in forbidden], [sub(a) for a in allowed])


def assert_layer(imports: list[Import], part: str) -> None:
    forbidden, allowed = LAYER_RULES[part]
    bad = check_layer(imports, part)
    extra = f" (except {', '.join(sub(a) for a in allowed)})" if allowed else ""
    fail_if(f"{sub(part)}.* must not import {', '.join(sub(f) for f in forbidden)}{extra}", bad)


def test_corpus_imports_no_other_part(imports: list[Import]) -> None:
    assert_layer(imports, "corpus")


def test_signal_imports_no_later_part(imports: list[Import]) -> None:
    assert_layer(imports, "signal")


def test_augment_imports_only_signal(imports: list[Import]) -> None:
    assert_layer(imports, "augment")


def test_nn_imports_no_other_part(imports: list[Import]) -> None:
    assert_layer(imports, "nn")


def test_shards_imports_only_signal(imports: list[Import]) -> None:
    assert_layer(imports, "shards")


def test_stream_imports_no_consumer(imports: list[Import]) -> None:
    assert_layer(imports, "stream")


def test_training_reads_shards_only_through_stream(imports: list[Import]) -> None:
    assert_layer(imports, "training")


def test_inference_imports_only_the_checkpoint_format_from_training(imports: list[Import]) -> None:
    assert_layer(imports, "inference")


def test_evaluation_imports_no_export_diarization_or_training(imports: list[Import]) -> None:
    assert_layer(imports, "evaluation")


def test_export_imports_only_the_bundle_from_inference(imports: list[Import]) -> None:
    assert_layer(imports, "export")


def test_diarization_imports_only_the_stored_threshold_from_evaluation(imports: list[Import]) -> None:
    assert_layer(imports, "diarization")


def test_pretrained_writes_runs_with_only_the_network_and_checkpoint_format(imports: list[Import]) -> None:
    assert_layer(imports, "pretrained")


def test_no_modules_import_each_other(imports: list[Import]) -> None:
    """No import loops, direct or through other modules, lazy (in a function) or under
    ``if TYPE_CHECKING:`` alike: every arrow between the package's modules points one way."""
    fail_if("modules that import each other (a loop, listed as the modules it passes through)",
            [" -> ".join(loop) for loop in import_loops(imports)])


def test_only_main_and_cli_import_cli(imports: list[Import]) -> None:
    bad = cli_importers(imports)
    fail_if("only dvector.__main__ and dvector.cli.* may import dvector.cli", bad)


def test_top_level_modules_import_no_subpackage(imports: list[Import]) -> None:
    bad = top_level_leaf_violations(imports, subpackages())
    fail_if("dvector/<module>.py (config, errors, metrics, files...) import only each other", bad)


def test_package_init_imports_use_only_lazily(imports: list[Import]) -> None:
    bad = package_init_violations(imports, subpackages())
    fail_if("dvector/__init__.py imports top-level modules, and dvector.inference only inside a function", bad)


def test_package_face_imported_only_by_cli_and_demo(imports: list[Import]) -> None:
    bad = package_face_importers(imports)
    fail_if("only dvector.cli and dvector.demo may import dvector itself (an import loop through __init__)", bad)


# ---------------------------------------------------------------------------------------------
# Shape and size
# ---------------------------------------------------------------------------------------------


def test_few_modules_directly_in_the_package() -> None:
    modules = sorted(p.name for p in PACKAGE_DIR.glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, (
        f"{len(modules)} modules directly in dvector/ (at most {MAX_TOP_LEVEL_MODULES}): {modules}"
    )


def test_every_subpackage_has_a_docstring_that_says_what_it_must_not_import() -> None:
    problems = []
    for name in subpackages():
        init = PACKAGE_DIR / name / "__init__.py"
        if not init.exists():
            problems.append(f"{rel(init)}: missing")
            continue
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"), filename=str(init))) or ""
        if not doc.strip():
            problems.append(f"{rel(init)}: no module docstring")
        elif not re.search(r"\b(never|only)\b", doc, re.IGNORECASE):
            problems.append(f"{rel(init)}: the docstring does not say what it must not import ('never' or 'only')")
    fail_if("sub-package __init__.py docstrings", problems)


def test_no_module_is_too_long() -> None:
    bad = []
    for path in package_files():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_MODULE_LINES:
            bad.append(f"{rel(path)}:1  {n} lines")
    fail_if(f"modules over {MAX_MODULE_LINES} lines", bad)


def test_no_function_is_too_long() -> None:
    bad: list[LongThing] = []
    for path in package_files():
        bad += long_functions(path.read_text(encoding="utf-8"), rel(path))
    fail_if(f"functions over {MAX_FUNCTION_LINES} lines, or over {EXPLAIN_FUNCTION_LINES} without 'Long because <reason>'", bad)


# ---------------------------------------------------------------------------------------------
# The checker itself: it can fail
# ---------------------------------------------------------------------------------------------


def test_layer_rule_bites() -> None:
    source = "from dvector.errors import DvectorError\nfrom dvector.nn.model import DVector\n"
    found = imports_in_source(source, "dvector.signal.x", known_modules={"dvector.nn.model", "dvector.errors"})
    bad = check_layer(found, "signal")
    assert [(b.importer, b.imported) for b in bad] == [("dvector.signal.x", "dvector.nn.model")]
    assert "dvector.signal.x -> dvector.nn.model" in report("r", bad)


def test_checker_sees_nested_relative_and_submodule_imports() -> None:
    source = (
        "import os\n"
        "def f():\n"
        "    class C:\n"
        "        def g(self):\n"
        "            from ..stream import loader\n"
        "            import dvector.training.loop as loop\n"
        "    return C\n"
        "from dvector.training import checkpoint\n"
        "from . import bundle\n"
        "from dvector import __version__\n"
    )
    known = {"dvector.stream.loader", "dvector.training.checkpoint", "dvector.inference.bundle", "dvector.training.loop"}
    found = imports_in_source(source, "dvector.inference.x", known_modules=known)
    pairs = {(i.imported, i.in_function) for i in found}
    assert pairs == {
        ("os", False),
        ("dvector.stream.loader", True),
        ("dvector.training.loop", True),
        ("dvector.training.checkpoint", False),
        ("dvector.inference.bundle", False),
        ("dvector", False),
    }
    bad = {i.imported for i in check_layer(found, "inference")}
    assert bad == {"dvector.stream.loader", "dvector.training.loop"}  # checkpoint is allowed
    assert [i.imported for i in package_face_importers(found)] == ["dvector"]


def test_relative_import_from_a_package_init() -> None:
    found = imports_in_source("from .format import x\nfrom .. import errors\n", "dvector.shards", is_package=True,
                              known_modules={"dvector.errors"})
    assert {i.imported for i in found} == {"dvector.shards.format", "dvector.errors"}


def test_cli_and_top_level_and_init_rules_bite() -> None:
    known = {"dvector.cli", "dvector.inference.embedder", "dvector.config"}
    assert cli_importers(imports_in_source("import dvector.cli\n", "dvector.inference.x", known_modules=known))
    assert not cli_importers(imports_in_source("from dvector.cli import main\n", "dvector.__main__", known_modules=known))
    assert not cli_importers(imports_in_source("from dvector.cli import app\n", "dvector.cli.summary", known_modules=known))

    top = imports_in_source("def f():\n    from dvector.inference import embedder\n", "dvector.metrics", known_modules=known)
    assert top_level_leaf_violations(top, ["inference"])
    assert not top_level_leaf_violations(imports_in_source("from dvector.config import X\n", "dvector.metrics"), ["inference"])
    # dvector/cli/__init__.py is the package dvector.cli, not a top-level module
    cli_init = imports_in_source("from dvector.inference import embedder\n", "dvector.cli", True, known)
    assert not top_level_leaf_violations(cli_init, ["cli", "inference"])

    lazy = imports_in_source("def f():\n    from dvector.inference import embedder\n", "dvector", True, known)
    eager = imports_in_source("from dvector.inference import embedder\n", "dvector", True, known)
    assert not package_init_violations(lazy, ["inference"])
    assert package_init_violations(eager, ["inference"])


def test_loop_rule_bites() -> None:
    modules = {
        "dvector.a": "def f():\n    from dvector import b\n",  # lazy
        "dvector.b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dvector.c import X\n",
        "dvector.c": "from dvector.a import f\nfrom dvector.d import g\n",
        "dvector.d": "import os\n",
        "dvector.e": "from dvector import e\n",
    }
    known = set(modules)
    found = [imp for name, src in modules.items() for imp in imports_in_source(src, name, known_modules=known)]
    assert import_loops(found) == [["dvector.a", "dvector.b", "dvector.c", "dvector.a"], ["dvector.e", "dvector.e"]]
    one_way = [imp for imp in found if not (imp.importer == "dvector.c" and imp.imported == "dvector.a")
               and imp.importer != "dvector.e"]
    assert import_loops(one_way) == []


def test_function_length_rule_bites() -> None:
    def body(n: int, indent: int = 4) -> str:  # n - 1 lines: the def line makes n
        return "".join(" " * indent + "x = 1\n" for _ in range(n - 1))

    src = (
        "@decorator\n"
        f"def ok():\n{body(80)}"
        f"def undocumented():\n{body(81)}"
        f'def explained():\n    """Long because the steps share state."""\n{body(80)}'
        f'def bare_phrase():\n    """Long because"""\n{body(85)}'
        f"class K:\n    def method(self):\n        def inner():\n            pass\n{body(122, 8)}"
    )
    found = {(t.name, t.lines) for t in long_functions(src, "fake.py")}
    assert found == {("undocumented", 81), ("bare_phrase", 86), ("method", 124)}


def test_test_file_names_are_unique() -> None:
    """Test folders have no __init__.py, so pytest imports test modules by file name: two files of
    one name in different folders would collide (an error at collection)."""
    tests = Path(__file__).resolve().parent
    names: dict[str, list[str]] = {}
    for path in tests.rglob("*.py"):
        names.setdefault(path.name, []).append(str(path.relative_to(tests)))
    clashes = {name: paths for name, paths in names.items() if len(paths) > 1}
    assert not clashes, f"test modules with the same name: {clashes}"
