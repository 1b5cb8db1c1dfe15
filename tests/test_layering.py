"""The package's import graph, read from the source: each module imports only from its own layer or those below,
and never a private name of another package (docs/DESIGN.md section 5).

Layers, lowest first: foundations (errors, common, versions, profiling) < the Triton kernels < the ops (and the
package's top level, which re-exports them) < the Hugging Face layer < adapter registration < serving, training
and the vLLM plugin < benchmarks and the command line. Imports inside functions count too. The top level's lazy
attributes (``sk.accelerate``, ``sk.PromptBank``) are an ``importlib`` call on first use, not an import edge.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "softprompt_kernels"
LAYERS = [
    {"_version", "_C", "versions", "common", "errors", "profiling", "cli_format"},
    {"triton"},
    {"ops", ""},  # "": the package's __init__
    {"hf"},
    {"adapters"},
    {"serving", "train", "vllm"},
    {"bench", "cli", "__main__"},
]


def _unit(module: str) -> str:
    """The first component under softprompt_kernels: the package (or top-level module) a module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(unit: str) -> int:
    for index, units in enumerate(LAYERS):
        if unit in units:
            return index
    raise AssertionError(f"softprompt_kernels.{unit} is in no layer of tests/test_layering.py: add it")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(relative.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(module: str, path: Path):
    """(imported module, imported name or None, line) for every import of a softprompt_kernels module."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "softprompt_kernels":
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "softprompt_kernels":
                continue
            for alias in node.names:
                yield target, alias.name, node.lineno


def _edges():
    for module, path in _modules():
        for target, name, line in _imports(module, path):
            yield module, path, target, name, line


def test_every_module_is_in_a_layer():
    for module, _ in _modules():
        _layer(_unit(module))


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for module, path, target, name, line in _edges():
        full = f"{target}.{name}" if name and _unit(target) == "" and name != "*" else target
        here, there = _layer(_unit(module)), _layer(_unit(full))
        if there > here:
            upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {full}")
    assert not upward, "imports from a layer above:\n" + "\n".join(upward)


def test_no_module_imports_a_private_name_of_another_package():
    private = []
    for module, path, target, name, line in _edges():
        if _unit(target) == _unit(module) and _unit(module) != "":
            continue  # inside one package its modules may share private names
        hidden = [part for part in target.split(".")[1:] + ([name] if name else []) if part.startswith("_")
                  and part not in ("__version__", "_version", "_C")]
        if hidden:
            private.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} {name or ''}")
    assert not private, "private names imported across packages:\n" + "\n".join(private)


@pytest.mark.parametrize("unit", ["triton", "ops"])
def test_the_kernel_and_op_layers_never_import_transformers_or_peft(unit):
    for module, path in _modules():
        if _unit(module) != unit:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("transformers", "peft") for n in names), f"{path} imports {names}"
