"""The one YAML reader for spec files (harness.spec, ci_select, verify): YAML 1.2 floats, no duplicate keys.

PyYAML resolves YAML 1.1, where `1e-6` is a string; YAML 1.2 (and JSON) read it as a float. PyYAML
also keeps the last of two equal keys without a word. Only this loader is changed, not PyYAML's.
"""
from __future__ import annotations

import re
from typing import Any

import yaml

# YAML 1.2 core-schema floats that YAML 1.1 misses: those with an exponent (the 1.1 resolver, which runs
# first, already takes dotted forms, ints, .inf and .nan; an unsigned or dotless exponent is what it lacks)
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$")


class SpecLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 exponent floats; add_implicit_resolver copies the table, SafeLoader is untouched."""


SpecLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, path: str, line: int, first_line: int):
        self.path, self.line, self.first_line = path, line, first_line
        super().__init__(f"duplicate key {path} at line {line} (first at line {first_line})")


def _child(path: str, key: Any) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))


def _check_duplicates(node: yaml.Node, path: str = "", seen_nodes: set[int] | None = None) -> None:
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias: already walked
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                ident, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
                if ident in first:
                    raise DuplicateKeyError(_child(path, key_node.value), line, first[ident])
                first[ident] = line
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            _check_duplicates(value_node, _child(path, name), seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicates(item, _child(path, index), seen_nodes)


def load_yaml(stream: str | bytes) -> Any:
    """yaml.safe_load with SpecLoader; raises DuplicateKeyError (a yaml.YAMLError) for a repeated key."""
    loader = SpecLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()
