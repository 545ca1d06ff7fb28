"""YAML files as the router reads them: rule files, their tests and the config file.

One parse gives the node tree (line numbers) and the data. On top of PyYAML's safe loader:
- no timestamp type: an unquoted 2024-01-01 stays the text it looks like (otherwise
  ``gte: 2024-01-01T00:00:00Z`` in a rule would be a datetime, and ``eq: 2024-01-01`` would
  never equal the text in an event);
- a key given twice is a problem (PyYAML keeps the last one silently: a second ``kafka:``
  section would drop the first without a word);
- aliases (``*name``) that refer to themselves or expand past MAX_EXPANDED_NODES values, and
  documents nested too deeply to parse, are problems, not a hang or a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import yaml


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader without the timestamp type (see the module docstring)."""


Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@dataclass(frozen=True)
class YamlProblem:
    line: int | None
    path: str
    message: str


@dataclass
class Document:
    data: Any = None
    root: yaml.Node | None = None
    problems: list[YamlProblem] = field(default_factory=list)


def read(text: str) -> Document:
    """Parse one YAML document; ``root`` is None when it could not be read at all."""
    loader = Loader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
        alias_problem = _alias_problem(root)
        if alias_problem is not None:
            return Document(problems=[YamlProblem(None, "$", alias_problem)])
        duplicates = _duplicate_keys(root)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        # PyYAML's context says what it was reading, often a line above the one it stopped on
        # (the key that lacks its colon, the first anchor of a duplicate): worth keeping.
        context = getattr(exc, "context", None)
        context_mark = getattr(exc, "context_mark", None)
        if context:
            at = f" on line {context_mark.line + 1}" if context_mark is not None else ""
            reason = f"{reason} ({context}{at})"
        if context == "while scanning a simple key" and context_mark is not None:
            # A key without its colon: PyYAML notices on the next line; the key's is the one.
            line = context_mark.line + 1
            reason = "a key without its ':' (or a line that continues the one above it)"
        elif "expected <block end>" in reason:
            reason += "; check this line's indentation against the lines above"
        return Document(problems=[YamlProblem(line, "$", f"not valid YAML: {reason}")])
    except RecursionError:  # the parser and the walks recurse; no real file is this deep
        return Document(problems=[YamlProblem(None, "$", "not valid YAML: nested too deeply")])
    finally:
        loader.dispose()
    return Document(data, root, [YamlProblem(line, path, why) for path, line, why in duplicates])


#: What a file may expand to through its aliases (*name): far beyond any rule file, far below
#: what hangs the checks ("billion laughs": nine aliases of nine aliases... in 500 bytes).
MAX_EXPANDED_NODES: Final = 200_000


def _alias_problem(root: yaml.Node | None) -> str | None:
    """Why the aliases of this node tree cannot be expanded (a cycle, or too many nodes)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise _AliasCycle
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        open_nodes.discard(key)
        sizes[key] = total = min(total, MAX_EXPANDED_NODES + 1)
        return total

    if root is None:
        return None
    try:
        if size(root) > MAX_EXPANDED_NODES:
            return f"aliases (*name) expand to more than {MAX_EXPANDED_NODES:,} values"
    except _AliasCycle:
        return "an alias (*name) refers to a value that contains it"
    return None


class _AliasCycle(Exception):
    pass


def _duplicate_keys(node: yaml.Node | None, path: str = "$") -> list[tuple[str, int, str]]:
    """PyYAML keeps the last of two equal keys silently; a file must not rely on that."""
    found: list[tuple[str, int, str]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                found.append(
                    (f"{path}.{key}", key_node.start_mark.line + 1, f"duplicate key {key!r}")
                )
            seen.add(key)
            found.extend(_duplicate_keys(value_node, f"{path}.{key}"))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found.extend(_duplicate_keys(item, f"{path}[{index}]"))
    return found
