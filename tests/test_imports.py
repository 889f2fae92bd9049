"""Imports flow one way: each module of the package imports only modules of its own layer or
of the layers below it (``LAYERS``), modules and folders import each other in no cycle, and an
import inside a function defers a heavy dependency and says which."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "tokenpacker_jax"

# Bottom to top. A name is a module or a folder of the package (every module in it); the
# longest name that matches a module places it. ``__main__`` modules are command-line shims:
# they run their folder's command and may import anything.
LAYERS = (
    ("sharding", "user_error"),  # the mesh and the logical-axis rules table; error types
    ("models",),  # Flax modules: no I/O
    ("data",),  # records -> examples -> batches; the batch contract; prompts
    ("configs", "configuration"),  # configs and their checks
    ("convert",),  # checkpoint formats (HF, the reference's) both ways
    ("tokenizer", "optim", "train_state", "train_step", "checkpoint", "checkpoint_integrity",
     "flops", "metrics", "tower_pretraining"),
    ("assembly",),  # models and runs assembled from configs
    ("reference_import", "run_export"),  # whole runs to and from PyTorch layouts
    ("generate", "region_maps", "evaluation", "serving"),  # inference and scoring
    ("train", "evaluate", "aot", "recipe", "quickstart", "conversion", "bench", "chat",
     "serve", "serving.lmms_eval_task", "data_stats"),  # commands
)
# What an import inside a function may defer (the reason must name one): optional or
# seconds-long imports; jax, for the evaluation commands that only score; absl, which the
# launch scripts (user_error's argparse side) run without.
HEAVY = ("torch", "transformers", "tensorflow_datasets", "tensorboardX", "pyarrow", "openpyxl",
         "jax", "absl")
NOQA = re.compile(r"#\s*noqa:[^#]*\bPLC0415\b\s*\((?P<reason>[^)]*)\)")


def _modules():
    """{dotted module name: path} of the package."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _layer(module: str) -> int:
    inner = module.split(".")[1:]
    if inner and inner[-1] == "__main__":
        return len(LAYERS)
    best = None
    for rank, names in enumerate(LAYERS):
        for name in names:
            parts = name.split(".")
            if inner[:len(parts)] == parts and (best is None or len(parts) > best[1]):
                best = (rank, len(parts))
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


def _unit(module: str) -> str:
    """The folder of a module in a subpackage, else the module itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _function_imports(tree) -> set[int]:
    """ids of the import statements inside functions."""
    return {id(child) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for child in ast.walk(node) if isinstance(child, (ast.Import, ast.ImportFrom))}


def _imports(path: Path, module: str):
    """(line, imported module name) of each import statement of ``path``."""
    tree = ast.parse(path.read_text())
    known = _modules()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
            # "from package import module" names a module; else the import is of ``base``.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        for name in names:
            yield node.lineno, name


def _graph():
    known = _modules()
    edges = {}
    for module, path in known.items():
        for _, name in _imports(path, module):
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith(PACKAGE + ".") and name != module:
                edges.setdefault(module, set()).add(name)
    return edges


def _cycle(edges):
    """One cycle of the directed graph, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target, stack)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_every_module_is_in_a_layer():
    for module in _modules():
        if module != PACKAGE:
            _layer(module)


def test_imports_go_down_the_layers():
    wrong = [f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
             for module, targets in _graph().items() for target in sorted(targets)
             if _layer(target) > _layer(module)]
    # The repository's configs/ folder holds files for --config=; the package owns the configs.
    wrong += [f"{module} imports {name}" for module, path in _modules().items()
              for _, name in _imports(path, module) if name.split(".")[0] == "configs"]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_modules_or_folders():
    edges = _graph()
    assert _cycle(edges) is None, _cycle(edges)
    folders = {}
    for module, targets in edges.items():
        if module.endswith(".__main__"):  # a shim nothing imports
            continue
        for target in targets:
            if _unit(target) != _unit(module):
                folders.setdefault(_unit(module), set()).add(_unit(target))
    assert _cycle(folders) is None, _cycle(folders)


def test_imports_inside_functions_defer_a_named_heavy_dependency():
    wrong = []
    for path in [*(ROOT / PACKAGE).rglob("*.py"), *(ROOT / "configs").glob("*.py")]:
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        in_function = _function_imports(tree)
        import_lines = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            import_lines.add(node.lineno)
            found = NOQA.search(lines[node.lineno - 1])
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if id(node) in in_function:
                if not found or not any(name in found["reason"] for name in HEAVY):
                    wrong.append(f"{where}: an import inside a function needs "
                                 f"'# noqa: PLC0415 (<one of {HEAVY}>: why)'")
            elif found:
                wrong.append(f"{where}: a module-level import with a PLC0415 noqa")
        for number, line in enumerate(lines, 1):
            if "PLC0415" in line and number not in import_lines:
                wrong.append(f"{path.relative_to(ROOT)}:{number}: PLC0415 off an import")
    assert not wrong, "\n".join(wrong)
