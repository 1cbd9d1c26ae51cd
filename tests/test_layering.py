"""The package's layering (docs/architecture.md): every module sits on a floor, and imports point down.

The imports are read with ``ast`` from the source files of the ``wuneng`` that is imported (so the test
checks whichever checkout ``PYTHONPATH`` selects), in two kinds:

- module-level imports (run when the module is imported; a class body and a module-level ``try`` count,
  ``if TYPE_CHECKING:`` blocks do not): they may not form a cycle, and may not point to a higher floor;
- function-level (lazy) imports: they may not point to a higher floor either, except the documented entry
  points in ``LAZY_UPWARD_ALLOWED`` (a model class method that hands over to the conversion module).

Imports within one floor are allowed (a module-level cycle is still an error). A new module that matches no
floor fails the test with its name: add it to ``FLOORS`` (and to docs/architecture.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import wuneng

# (floor, name prefixes); the first matching prefix wins, so sub-packages are listed before their parents.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    # 0: no wuneng imports of their own: importable from any floor
    ("base", ("wuneng.progress", "wuneng.runtime", "wuneng.labels")),
    ("ops", ("wuneng.ops",)),
    # fused decoding kernels of whole layers (C and their tensor-op references): above the operators they call
    ("fused", ("wuneng.fused",)),
    ("layers", ("wuneng.layers",)),
    # RWKV-LM <-> transformers checkpoint conversion sits above the RWKV-7 model it builds
    ("conversion", ("wuneng.models.rwkv7.convert_rwkv_lm", "wuneng.models.rwkv7.convert_fla")),
    ("models", ("wuneng.cache", "wuneng.models", "wuneng.auto_map", "wuneng.saving", "wuneng.tokenization")),
    ("conversion", ("wuneng.convert", "wuneng.grow")),
    ("train/eval", ("wuneng.train", "wuneng.eval", "wuneng.select_layers")),  # select_layers trains probes
    ("applications", ("wuneng.cli", "wuneng.apps")),  # the CLI and the demo and benchmark apps
]
FLOOR_ORDER = ["base", "ops", "fused", "layers", "models", "conversion", "train/eval", "applications"]
PACKAGE_ROOT = "wuneng"  # the root __init__ only re-exports lazily (PEP 562): no floor of its own

# (importer, imported) -> why a lazy upward import is right there
LAZY_UPWARD_ALLOWED = {
    (
        "wuneng.models.wuneng.modeling_wuneng",
        "wuneng.convert",
    ): "WuNengForCausalLM.from_teacher: the thin documented entry point to wuneng.convert.convert_teacher",
    (
        "wuneng.models.rwkv7.modeling_rwkv7",
        "wuneng.models.rwkv7.convert_rwkv_lm",
    ): "RWKV7ForCausalLM.from_rwkv_lm / to_rwkv_lm_state_dict: entry points to the RWKV-LM converter",
    (
        "wuneng.models.rwkv7.modeling_rwkv7",
        "wuneng.models.rwkv7.convert_fla",
    ): "RWKV7ForCausalLM.from_fla / to_fla: entry points to the flash-linear-attention converter",
}


def package_modules() -> dict[str, Path]:
    """Every module of the imported ``wuneng`` package: dotted name -> source file."""
    root = Path(wuneng.__file__).resolve().parent
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def floor_of(module: str) -> str | None:
    for floor, prefixes in FLOORS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return floor
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import, modules: dict) -> list[str]:
    """The wuneng modules an import statement loads (the longest existing module name for each)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base_parts = module.split(".") if is_package else module.split(".")[:-1]
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        # `from pkg import name`: name may be a submodule
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    found = []
    for name in names:
        if not (name == PACKAGE_ROOT or name.startswith(PACKAGE_ROOT + ".")):
            continue
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules and name not in found:
            found.append(name)
    return found


def module_imports(modules: dict[str, Path]) -> dict[str, dict[str, list[tuple[str, int]]]]:
    """module -> {"module": [(imported, line)], "function": [(imported, line)]}."""
    result = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        edges: dict[str, list[tuple[str, int]]] = {"module": [], "function": []}

        _collect(tree, False, module, is_package, modules, edges)
        result[module] = edges
    return result


def _collect(node, in_function: bool, module: str, is_package: bool, modules: dict, edges: dict) -> None:
    """Add the wuneng imports under ``node`` to ``edges`` (module- or function-level)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for sub in child.orelse:
                _collect(ast.Module(body=[sub], type_ignores=[]), in_function, module, is_package, modules, edges)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            kind = "function" if in_function else "module"
            for target in _resolve(module, is_package, child, modules):
                if target != module:
                    edges[kind].append((target, child.lineno))
        nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        _collect(child, nested, module, is_package, modules, edges)


def module_level_cycles(imports) -> list[list[str]]:
    """Every cycle of the module-level import graph, as the modules on it (one rotation each)."""
    graph = {m: sorted({t for t, _ in e["module"]}) for m, e in imports.items()}
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = [0]

    def strongconnect(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
            if w not in index:
                strongconnect(w)
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
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return components


def upward_imports(imports, kind: str) -> list[str]:
    problems = []
    for module, edges in sorted(imports.items()):
        if module == PACKAGE_ROOT:
            continue
        here = FLOOR_ORDER.index(floor_of(module))
        for target, line in edges[kind]:
            if target == PACKAGE_ROOT:
                continue
            there = FLOOR_ORDER.index(floor_of(target))
            if there > here and not (kind == "function" and (module, target) in LAZY_UPWARD_ALLOWED):
                problems.append(f"{module}:{line} ({floor_of(module)}) imports {target} ({floor_of(target)})")
    return problems


def test_every_module_has_a_floor():
    unplaced = [m for m in package_modules() if m != PACKAGE_ROOT and floor_of(m) is None]
    assert not unplaced, f"modules on no floor (add them to FLOORS in {__file__} and docs/architecture.md): {unplaced}"


def test_no_module_level_import_cycle():
    cycles = module_level_cycles(module_imports(package_modules()))
    assert not cycles, "module-level import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_upward_module_level_import():
    problems = upward_imports(module_imports(package_modules()), "module")
    assert not problems, "upward module-level imports (floors " + " < ".join(FLOOR_ORDER) + "):\n" + "\n".join(problems)


def test_no_upward_lazy_import_except_entry_points():
    problems = upward_imports(module_imports(package_modules()), "function")
    assert not problems, (
        "upward function-level imports (floors " + " < ".join(FLOOR_ORDER) + "):\n" + "\n".join(problems)
    )


def test_allowed_entry_points_still_exist():
    """An allow-list entry whose import is gone is removed, so the list says what the code does."""
    modules = package_modules()
    imports = module_imports(modules)
    stale = [
        pair
        for pair in LAZY_UPWARD_ALLOWED
        if pair[1] in modules and pair[1] not in {t for t, _ in imports.get(pair[0], {}).get("function", [])}
    ]
    assert not stale, f"LAZY_UPWARD_ALLOWED entries with no such import any more: {stale}"


def test_the_walker_sees_cycles_and_upward_imports(tmp_path):
    """The checks themselves can fail: a made-up graph with a cycle and an upward import is caught."""
    fake = {
        "wuneng.ops.a": {"module": [("wuneng.layers.b", 3)], "function": [("wuneng.cli", 9)]},
        "wuneng.layers.b": {"module": [("wuneng.ops.a", 1)], "function": []},
    }
    assert module_level_cycles(fake) == [["wuneng.layers.b", "wuneng.ops.a"]]
    assert upward_imports(fake, "module") == ["wuneng.ops.a:3 (ops) imports wuneng.layers.b (layers)"]
    assert upward_imports(fake, "function") == ["wuneng.ops.a:9 (ops) imports wuneng.cli (applications)"]
    # relative imports resolve against the package; a lazy import inside a function is function-level
    pkg = tmp_path / "wuneng"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("from .x import f\n")
    (pkg / "ops" / "x.py").write_text("from ..cli import app\n\ndef f():\n    from wuneng import ops\n")
    (pkg / "cli.py").write_text("")
    modules = {
        "wuneng": pkg / "__init__.py",
        "wuneng.ops": pkg / "ops" / "__init__.py",
        "wuneng.ops.x": pkg / "ops" / "x.py",
        "wuneng.cli": pkg / "cli.py",
    }
    found = module_imports(modules)
    assert found["wuneng.ops"] == {"module": [("wuneng.ops.x", 1)], "function": []}
    assert found["wuneng.ops.x"] == {"module": [("wuneng.cli", 1)], "function": [("wuneng.ops", 4)]}


def test_c_sources_include_only_their_floor_or_below():
    """The C sources follow the floors too: the operators' ``csrc`` includes only its own headers (it knows nothing
    of the fused kernels), the fused floor's ``csrc`` its own and the operators' (given with -I by its build)."""
    import re

    root = Path(wuneng.__file__).resolve().parent
    allowed = {
        root / "ops" / "wkv7" / "csrc": [root / "ops" / "wkv7" / "csrc"],
        root / "fused" / "csrc": [root / "fused" / "csrc", root / "ops" / "wkv7" / "csrc"],
    }
    problems = []
    for folder, search in allowed.items():
        assert folder.is_dir(), folder
        for source in sorted(folder.glob("*.[ch]")):
            for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', source.read_text(encoding="utf-8"), re.M):
                if not any((where / name).is_file() and (where / name).resolve().parent == where for where in search):
                    problems.append(
                        f"{source.relative_to(root)} includes {name!r}, not in {[str(w.relative_to(root)) for w in search]}"
                    )
    assert not problems, problems


def test_one_definition_per_shared_constant():
    """IGNORE_INDEX (the label that is not a target) is defined once, in wuneng.labels, and imported elsewhere."""
    definitions = []
    for module, path in package_modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "IGNORE_INDEX" for t in targets):
                    definitions.append(module)
    assert definitions == ["wuneng.labels"], f"IGNORE_INDEX defined in {definitions}; import it from wuneng.labels"


# ---------------------------------------------------------------------------------------------- dependencies
REPO = Path(__file__).resolve().parents[1]
IMPORT_TO_DISTRIBUTION = {"yaml": "pyyaml", "fla": "flash-linear-attention", "lm_eval": "lm-eval"}


def _requirement_names(requirements: list[str]) -> set[str]:
    from packaging.requirements import Requirement

    return {Requirement(r).name.lower() for r in requirements}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def third_party_imports(kind: str) -> dict[str, list[str]]:
    """Distribution name -> the modules that import it (``kind``: "module" or "function" level)."""
    import sys

    found: dict[str, list[str]] = {}
    for module, path in package_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        stack = [(tree, False)]
        while stack:
            node, in_function = stack.pop()
            for child in ast.iter_child_nodes(node):
                nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.If) and _is_type_checking(child):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function == (kind == "function"):
                    if isinstance(child, ast.ImportFrom):
                        names = [] if child.level else [child.module or ""]
                    else:
                        names = [alias.name for alias in child.names]
                    for name in names:
                        top = name.split(".")[0]
                        if top and top != PACKAGE_ROOT and top not in sys.stdlib_module_names:
                            found.setdefault(IMPORT_TO_DISTRIBUTION.get(top, top).lower(), []).append(module)
                stack.append((child, nested))
    return found


def test_module_level_imports_need_only_the_core_dependencies():
    """What `import wuneng.<anything>` loads is installed by `pip install wuneng` (no extra); matplotlib,
    datasets, lm-eval and fla are imported only inside the functions that need them."""
    core = _requirement_names(_pyproject()["project"]["dependencies"])
    outside = {dist: mods for dist, mods in third_party_imports("module").items() if dist not in core}
    assert not outside, f"module-level imports of packages that are not core dependencies: {outside}"


def test_lazy_imports_are_declared_in_an_extra():
    project = _pyproject()["project"]
    declared = _requirement_names(project["dependencies"])
    for requirements in project["optional-dependencies"].values():
        declared |= _requirement_names(requirements)
    declared |= {"click"}  # typer's own dependency; wuneng.cli imports it guarded, for its exception classes
    undeclared = {dist: mods for dist, mods in third_party_imports("function").items() if dist not in declared}
    assert not undeclared, f"lazy imports of packages no dependency list names: {undeclared}"


def test_ci_constraints_lie_in_the_supported_ranges():
    """constraints/ci.txt (the exact versions CI installs) satisfies every range of pyproject.toml."""
    from packaging.requirements import Requirement

    pins = {}
    for line in (REPO / "constraints" / "ci.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    project = _pyproject()["project"]
    requirements = list(project["dependencies"]) + [r for rs in project["optional-dependencies"].values() for r in rs]
    outside = []
    for text in requirements:
        requirement = Requirement(text)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} ({text}) has no pin in constraints/ci.txt"
        if not requirement.specifier.contains(pins[name], prereleases=True):
            outside.append(f"{name}=={pins[name]} not in {requirement.specifier}")
    assert not outside, outside
