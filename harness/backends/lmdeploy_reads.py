"""Which HF config attributes an lmdeploy model class reads, found in its source (no CUDA needed).

lmdeploy's ModelConfig carries only the sizes (hidden, layers, heads, head_dim, vocab, sliding
window); everything else (rms_norm_eps, rope, intermediate_size, biases, tie_word_embeddings) the
model class reads from the HF config itself. Building the class needs CUDA, so the reads are found
statically: `config.X`, `self.config.X`, `getattr/hasattr(config, "X")` in the class's module,
in the modules of its base classes, and in the modules of helpers it hands `config` to
(one level: lmdeploy's build_rotary_embedding_from_config reads the rope keys).
"""
from __future__ import annotations

import ast
import importlib.util
import inspect
from types import ModuleType

# activation modules lmdeploy's model classes instantiate -> the HF hidden_act they implement
ACTIVATION_CLASSES = {"SiluAndMul": "silu", "GeluAndMul": "gelu"}


def _is_config(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id == "config"
    return (isinstance(node, ast.Attribute) and node.attr == "config" and isinstance(node.value, ast.Name)
            and node.value.id == "self")


def scan(source: str) -> tuple[set[str], set[str], set[str]]:
    """(attributes read on config, names called with config as an argument, activation classes called)."""
    reads, helpers, activations = set(), set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _is_config(node.value):
            reads.add(node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = node.func.id
            if name in ("getattr", "hasattr") and len(node.args) >= 2 and _is_config(node.args[0]) \
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                reads.add(node.args[1].value)
            elif any(_is_config(arg) for arg in node.args):
                helpers.add(name)
            if name in ACTIVATION_CLASSES:
                activations.add(name)
    return reads, helpers, activations


def _module_source(module: ModuleType) -> str | None:
    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return None


def _file_source(module_name: str) -> str | None:
    """A module's source without importing it (when importing needs CUDA)."""
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if found is None or not found.origin or not found.origin.endswith(".py"):
        return None
    with open(found.origin, encoding="utf-8") as handle:
        return handle.read()


def class_reads(qualname: str, cls: type | None) -> dict:
    """{"reads": attrs, "activation": the hidden_act the class hard-codes or None, "scanned": modules}."""
    sources: dict[str, str | None] = {}
    namespaces: dict[str, dict] = {}
    if cls is None:  # not importable here: read its own file only
        module_name = qualname.rpartition(".")[0]
        sources[module_name] = _file_source(module_name)
    else:
        for base in cls.__mro__:
            module = inspect.getmodule(base)
            if module is None or module.__name__.split(".")[0] in ("torch", "builtins", "typing"):
                continue
            sources.setdefault(module.__name__, _module_source(module))
            namespaces[module.__name__] = vars(module)
    reads: set[str] = set()
    activations: set[str] = set()
    helpers: dict[str, set[str]] = {}
    for name, source in list(sources.items()):
        if source is not None:
            found, helpers[name], acts = scan(source)
            reads |= found
            activations |= acts
    # one level into helpers from other modules that receive `config` (lmdeploy's rope builders)
    for name, called in helpers.items():
        for helper in called:
            target = namespaces.get(name, {}).get(helper)
            module = inspect.getmodule(target) if target is not None else None
            if module is None or module.__name__ in sources:
                continue
            sources[module.__name__] = _module_source(module)
            if sources[module.__name__] is not None:
                reads |= scan(sources[module.__name__])[0]
    fixed = {ACTIVATION_CLASSES[a] for a in activations}
    return {"reads": sorted(reads), "activation": fixed.pop() if len(fixed) == 1 else None,
            "scanned": sorted(m for m, s in sources.items() if s is not None)}
