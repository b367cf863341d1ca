"""Typed, located reads of a composed YAML document, for validation errors users can act on.

PyYAML's composer keeps every node's position; `Field` walks that tree and
raises `PolicyError("policies/web.yaml", 14, "spec.ingress[0].ports[1].port",
"70000 is not a port")`. Scalars are resolved with the safe constructor, so
YAML 1.1 types (`1` is an int, `yes` a bool) are what the user's file says.
Unknown keys and duplicate keys are errors: a typo must never silently widen
or narrow a policy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from nova.errors import UsageError

_YAML_TYPES = {
    "tag:yaml.org,2002:str": "a string",
    "tag:yaml.org,2002:int": "a number",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:null": "empty",
    "tag:yaml.org,2002:timestamp": "a timestamp",
}


class PolicyError(UsageError):
    """A policy source that does not parse or validate: `source:line: field: reason`."""

    def __init__(self, source: str, line: int, field: str, reason: str) -> None:
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {field}: {reason}" if field else f"{where}: {reason}")
        self.source = source
        self.line = line
        self.field = field
        self.reason = reason


def documents(text: str, source: str) -> Iterator[Field]:
    """The non-empty documents of a (multi-document) YAML text, as root fields."""
    try:
        nodes = _compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        raise PolicyError(source, line, "", f"not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(source, 0, "", f"not valid YAML: {exc}") from None
    except RecursionError:
        raise PolicyError(source, 0, "", "not valid YAML: nested too deeply") from None
    for node in nodes:
        if node is None or (isinstance(node, ScalarNode) and node.tag.endswith(":null")):
            continue
        yield Field(node, "", source)


# libyaml's composer is ten times faster than PyYAML's (a 1,000-rule file: ~40 ms, not
# ~430 ms) but recurses in C: a hostile file nested deeper than the stack would crash the
# agent, not raise. Its event parser does not recurse, so the depth is checked first.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_DEPTH = 64  # a policy nests about 8 deep
_OPEN = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSE = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def _compose(text: str) -> list[Node | None]:
    if _LOADER is not yaml.SafeLoader:
        depth = 0
        for event in yaml.parse(text, Loader=_LOADER):
            if isinstance(event, _OPEN):
                depth += 1
                if depth > MAX_DEPTH:
                    raise RecursionError  # reported as "nested too deeply"
            elif isinstance(event, _CLOSE):
                depth -= 1
    return list(yaml.compose_all(text, Loader=_LOADER))


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return _YAML_TYPES.get(node.tag, f"a {node.tag}")


@dataclass(frozen=True, slots=True)
class Field:
    """One node of the document with its dotted path (`spec.ingress[0]`) and source name."""

    node: Node
    path: str
    source: str

    @property
    def line(self) -> int:
        return int(self.node.start_mark.line) + 1

    def error(self, reason: str) -> PolicyError:
        return PolicyError(self.source, self.line, self.path, reason)

    def _child(self, node: Node, name: str) -> Field:
        return Field(node, f"{self.path}.{name}" if self.path else name, self.source)

    # -- containers -----------------------------------------------------------

    def mapping(self, allowed: frozenset[str] | None = None) -> dict[str, Field]:
        """The mapping's entries by key; unknown (when `allowed` is given) and duplicate keys
        are errors naming the key's own line."""
        if not isinstance(self.node, MappingNode):
            raise self.error(f"expected a mapping, got {_describe(self.node)}")
        entries: dict[str, Field] = {}
        for key_node, value_node in self.node.value:
            key_field = Field(key_node, self.path, self.source)
            if not (isinstance(key_node, ScalarNode) and key_node.tag.endswith(":str")):
                raise key_field.error(f"keys must be strings, got {_describe(key_node)}")
            key = str(key_node.value)
            if key in entries:
                raise self._child(key_node, key).error(
                    f"duplicate key (first at line {entries[key].line})"
                )
            if allowed is not None and key not in allowed:
                raise self._child(key_node, key).error(
                    f"unknown field; expected one of: {', '.join(sorted(allowed))}"
                )
            entries[key] = self._child(value_node, key)
        return entries

    def sequence(self) -> list[Field]:
        if not isinstance(self.node, SequenceNode):
            raise self.error(f"expected a list, got {_describe(self.node)}")
        return [
            Field(item, f"{self.path}[{i}]", self.source) for i, item in enumerate(self.node.value)
        ]

    def optional_sequence(self) -> list[Field]:
        """A list where an explicit `null` (an empty YAML value) means an empty list."""
        return [] if self.is_null else self.sequence()

    # -- scalars --------------------------------------------------------------

    @property
    def is_null(self) -> bool:
        return isinstance(self.node, ScalarNode) and self.node.tag.endswith(":null")

    def _scalar(self) -> Any:
        if not isinstance(self.node, ScalarNode):
            raise self.error(f"expected a single value, got {_describe(self.node)}")
        try:
            return SafeConstructor().construct_object(self.node, deep=True)
        except yaml.YAMLError as exc:  # an unknown tag (`!foo`), a malformed !!int ...
            problem = getattr(exc, "problem", None) or exc
            raise self.error(f"cannot read this value: {problem}") from None

    def string(self) -> str:
        value = self._scalar()
        if not isinstance(value, str):
            raise self.error(
                f"expected a string, got {_describe(self.node)} "
                f"({self.node.value!r}); quote it: '{self.node.value}'"
            )
        return value

    def integer(self) -> int:
        value = self._scalar()
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"expected a whole number, got {_describe(self.node)}")
        return value

    def string_or_integer(self) -> str | int:
        value = self._scalar()
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise self.error(f"expected a number or a name, got {_describe(self.node)}")
        return value

    def string_map(self) -> dict[str, Field]:
        """A mapping whose values must be strings (labels); values are returned as fields."""
        entries = self.mapping()
        for value in entries.values():
            value.string()
        return entries
