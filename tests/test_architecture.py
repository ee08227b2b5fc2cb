"""The package's import structure: layers that only import downwards, no cycles, no hidden imports.

Every module of ``monai_segdiff`` belongs to one layer; a module may import modules of its own layer
or of a lower one, never of a higher one. Layers, bottom to top:

===========  ==========================================================================================
layer        modules
===========  ==========================================================================================
base         the package ``__init__``, errors (exception classes), atomic (atomic file writing),
             values (JSON-safe numbers, request flags, a 2D affine as 3D),
             config (``SegDiffConfig``, the option vocabularies and their parsers, the checkpoint
             format)
data         data (studies folder -> datalist), cache, busy, slicer_io, transforms, validation,
             io (reading images / labels, writing outputs), labelset, labelstore (a submitted label)
networks     networks/ (one network per file, the registry, ``build_network``), losses
diffusion    diffusion/ (schedule, objective, sampler, inferer)
uncertainty  uncertainty (fusion, maps, scores), metrics, postprocess, tta
inference    segmenter (the one inference path: it uses fusion, uncertainty, clean-up and flips,
             so it sits above them rather than beside the diffusion inferer)
training     ddp (process-group building blocks), planning (a new model's config from the data, the
             fine-tune check), training (the loop), distributed (the multi-process launcher, above
             the loop), retrain (fine-tune or new model, baseline, publish only if better)
faces        cli, bundle, report, evaluation, al_simulation, bench, tracking, served (a server's model)
===========  ==========================================================================================

Inside a layer imports may go either way, as long as there is no cycle. Every import counts: module
level, inside functions and classes, and under ``if TYPE_CHECKING`` (those count like module-level
imports: a type-only dependency on a higher layer is still an upward dependency). A function-level
import is a failure unless it loads one of the heavy optional dependencies of ``LAZY_ALLOWED``,
never a module of the package. ``monailabel`` is never imported by the library (only by the app in
``apps/``).

The checker reads source files with ``ast`` only: nothing of the package is imported here.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "monai_segdiff"

#: (layer, modules) bottom to top; "" is the package's own ``__init__``, a subpackage covers its files
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("", "errors", "atomic", "values", "config")),
    ("data", ("data", "cache", "busy", "slicer_io", "transforms", "validation", "io", "labelset", "labelstore",
              "clicks")),
    ("networks", ("networks", "losses")),
    ("diffusion", ("diffusion",)),
    ("uncertainty", ("uncertainty", "metrics", "postprocess", "tta", "selection")),
    ("inference", ("segmenter",)),
    ("training", ("ddp", "planning", "interaction", "training", "distributed", "retrain")),
    ("faces", ("cli", "bundle", "report", "evaluation", "al_simulation", "bench", "click_bench", "tracking", "served")),
]

#: third-party modules that may be imported inside a function (heavy, and only some calls need them)
LAZY_ALLOWED = {
    "matplotlib": "about 0.3 s; only drawing a picture or a heat map needs it",
    "torch.utils.tensorboard": "tensorboard's writers; only a run that logs to TensorBoard needs them",
}

FORBIDDEN = {"monailabel": "the library is shared by the CLI and the app; only apps/ may import MONAI Label"}


@dataclass(frozen=True)
class Import:
    """One import statement's target as seen from ``module``."""

    module: str  # importing module, dotted, relative to the package ("" = the package __init__)
    target: str  # imported module: relative dotted name inside the package, else the absolute name
    internal: bool  # target is a module of the package
    line: int
    in_function: bool  # inside a function or method body (lambdas included)


def module_names(package_dir: Path) -> dict[str, Path]:
    """``{dotted name relative to the package: file}``; ``""`` is the package ``__init__``."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(module: str, path: Path, package: str, modules: dict[str, Path]) -> list[Import]:
    """Every import statement of one module (anywhere in the file), with its targets resolved: a
    ``from X import name`` whose ``X.name`` is a module of the package counts as an import of it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own_package = module.split(".") if module else []
    if path.name != "__init__.py":
        own_package = own_package[:-1]
    found: list[Import] = []

    def internal(parts: list[str], names: list[str], line: int, in_function: bool) -> None:
        base = ".".join(parts)
        targets = [f"{base}.{n}" if base else n for n in names]
        hits = [t for t in targets if t in modules]
        if len(hits) < len(targets) or not names:  # names defined in ``base`` itself, or ``import base``
            if base not in modules:
                raise AssertionError(f"{path}:{line}: import of a missing module {package}.{base}")
            hits.append(base)
        found.extend(Import(module, hit, True, line, in_function) for hit in dict.fromkeys(hits))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    parts = alias.name.split(".")
                    if parts[0] == package:
                        internal(parts[1:], [], child.lineno, in_function)
                    else:
                        found.append(Import(module, alias.name, False, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                names = [a.name for a in child.names]
                parts = child.module.split(".") if child.module else []
                if child.level:
                    up = child.level - 1
                    if up > len(own_package):
                        raise AssertionError(f"{path}:{child.lineno}: relative import beyond the package")
                    internal(own_package[: len(own_package) - up] + parts, names, child.lineno, in_function)
                elif parts[0] == package:
                    internal(parts[1:], names, child.lineno, in_function)
                else:
                    found.append(Import(module, child.module, False, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def layer_of(module: str, layers: list[tuple[str, tuple[str, ...]]]) -> int | None:
    """Index of the layer holding ``module`` (a subpackage entry covers the files below it)."""
    for index, (_, members) in enumerate(layers):
        for member in members:
            if module == member or (member and module.startswith(member + ".")):
                return index
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def check_package(package_dir: Path, layers: list[tuple[str, tuple[str, ...]]] = LAYERS,
                  lazy_allowed: dict[str, str] = LAZY_ALLOWED, forbidden: dict[str, str] = FORBIDDEN) -> list[str]:
    """Every violation of the rules in the module doc, one readable line each (empty: all good)."""
    package = package_dir.name
    modules = module_names(package_dir)
    show = lambda m: f"{package}.{m}" if m else package  # noqa: E731
    problems = [f"{show(m)} is in no layer: add it to LAYERS" for m in modules if layer_of(m, layers) is None]
    listed = [m for _, members in layers for m in members]
    problems += [f"LAYERS names {show(m)}, which does not exist" for m in listed
                 if m not in modules and not any(n.startswith(m + ".") for n in modules)]
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        where = lambda imp: f"{path.relative_to(package_dir.parent)}:{imp.line}"  # noqa: E731
        for imp in imports_of(module, path, package, modules):
            if not imp.internal:
                top = imp.target.split(".")[0]
                if top in forbidden:
                    problems.append(f"{where(imp)}: {show(module)} imports {imp.target} ({forbidden[top]})")
                if imp.in_function and not any(imp.target == a or imp.target.startswith(a + ".") for a in lazy_allowed):
                    problems.append(f"{where(imp)}: {show(module)} imports {imp.target} inside a function; import it "
                                    "at module level (or add a heavy optional dependency to LAZY_ALLOWED, with why)")
                continue
            if imp.target == module:
                continue
            graph[module].add(imp.target)
            if imp.in_function:
                problems.append(f"{where(imp)}: {show(module)} imports {show(imp.target)} inside a function; "
                                "package modules are imported at module level")
            low, high = layer_of(imp.target, layers), layer_of(module, layers)
            if low is not None and high is not None and low > high:
                problems.append(f"{where(imp)}: upward import: {show(module)} ({layers[high][0]}) imports "
                                f"{show(imp.target)} ({layers[low][0]})")
    for component in cycles(graph):
        problems.append(f"import cycle between {', '.join(show(m) for m in component)}")
    return problems


# -- the package ---------------------------------------------------------------------------------------
def test_package_imports_point_down_without_cycles_or_hidden_imports():
    problems = check_package(PACKAGE_DIR)
    assert not problems, "import structure broken:\n" + "\n".join(problems)


def test_package_graph_is_not_empty():
    """The checker sees the imports it should (guards against a resolver that silently finds nothing)."""
    modules = module_names(PACKAGE_DIR)
    edges = {(i.module, i.target) for m, p in modules.items() for i in imports_of(m, p, "monai_segdiff", modules)
             if i.internal}
    assert ("training", "ddp") in edges and ("distributed", "training") in edges
    assert ("networks", "networks.registry") in edges and ("networks.registry", "networks.cimd") in edges
    assert ("bundle", "") in edges  # from . import __version__
    assert ("io", "atomic") in edges and ("labelset", "io") in edges


# -- the checker itself, on a small made-up package -------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_reports_cycles_upward_hidden_and_forbidden_imports(tmp_path):
    pkg = _write(tmp_path / "fakepkg", {
        "__init__.py": "",
        "low.py": "from .high import thing\n",  # upward, and a cycle with high
        "mid.py": "def f():\n    from . import low\n    import numpy\n    return low, numpy\n",
        "high.py": "from . import low\nimport monailabel\n\ndef plot():\n    from matplotlib.figure import Figure\n"
                   "    return Figure\n\nthing = 1\n",
        "sub/__init__.py": "from .leaf import x\n",
        "sub/leaf.py": "from ..low import *\nx = 1\n",
        "stray.py": "",
    })
    layers = [("bottom", ("", "low", "sub")), ("middle", ("mid",)), ("top", ("high",))]
    problems = check_package(pkg, layers, lazy_allowed={"matplotlib": "heavy"}, forbidden=FORBIDDEN)
    text = "\n".join(problems)
    assert "fakepkg.stray is in no layer" in text
    assert "upward import: fakepkg.low (bottom) imports fakepkg.high (top)" in text
    assert "import cycle between fakepkg.high, fakepkg.low" in text
    assert "fakepkg.mid imports fakepkg.low inside a function" in text
    assert "fakepkg.mid imports numpy inside a function" in text
    assert "fakepkg.high imports monailabel" in text
    assert "matplotlib" not in text  # allowed lazily
    assert "fakepkg.sub" not in text  # downward imports inside the bottom layer are fine
    assert len(problems) == 6, text


def test_checker_accepts_a_clean_package(tmp_path):
    pkg = _write(tmp_path / "cleanpkg", {
        "__init__.py": "__version__ = '1'\n",
        "base.py": "import os\n",
        "top.py": "from typing import TYPE_CHECKING\nfrom . import __version__, base\nif TYPE_CHECKING:\n"
                  "    from .base import os\n",
    })
    assert check_package(pkg, [("base", ("", "base")), ("top", ("top",))], {}, FORBIDDEN) == []
