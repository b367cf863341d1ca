"""Label selectors as Kubernetes defines them, and their validation from YAML.

A selector is written either the Kubernetes way (`matchLabels` and/or
`matchExpressions` with In, NotIn, Exists, DoesNotExist) or as the product
brief's plain label map (`podSelector: {tier: web}`, meaning matchLabels).
`{}` selects everything. Both parts of a selector must hold (AND).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

from agent.netpol.yamltree import Field

_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_NAME = re.compile(_NAME)
DNS_SUBDOMAIN = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*")
_SELECTOR_KEYS = frozenset({"matchLabels", "matchExpressions"})
_EXPRESSION_KEYS = frozenset({"key", "operator", "values"})


class Operator(enum.StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator is Operator.IN:
            return labels.get(self.key) in self.values
        if self.operator is Operator.NOT_IN:
            # Kubernetes: a missing label satisfies NotIn.
            return labels.get(self.key) not in self.values
        if self.operator is Operator.EXISTS:
            return self.key in labels
        return self.key not in labels


@dataclass(frozen=True, slots=True)
class LabelSelector:
    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    @property
    def selects_all(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.match_expressions
        )


SELECT_ALL = LabelSelector()


def label_key_problem(key: str) -> str | None:
    """Why `key` is not a Kubernetes qualified name (`[prefix/]name`), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > 253 or not DNS_SUBDOMAIN.fullmatch(prefix)):
        return f"label key {key!r}: prefix {prefix!r} is not a DNS subdomain"
    if not name or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return (
            f"label key {key!r} is invalid: at most 63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit (optionally after 'prefix/')"
        )
    return None


def label_value_problem(value: str) -> str | None:
    """Why `value` is not a valid label value, or None."""
    if value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
        return (
            f"label value {value!r} is invalid: empty, or at most 63 letters, digits, "
            "'-', '_' or '.', starting and ending with a letter or digit"
        )
    return None


def check_label_key(field: Field, key: str) -> None:
    problem = label_key_problem(key)
    if problem is not None:
        raise field.error(problem)


def check_label_value(field: Field, value: str) -> None:
    problem = label_value_problem(value)
    if problem is not None:
        raise field.error(problem)


def parse_labels(field: Field) -> dict[str, str]:
    """A label map (`{tier: web}`) with Kubernetes' rules for keys and values."""
    labels: dict[str, str] = {}
    for key, value_field in field.string_map().items():
        check_label_key(value_field, key)
        value = value_field.string()
        check_label_value(value_field, value)
        labels[key] = value
    return labels


def parse_selector(field: Field) -> LabelSelector:
    entries = field.mapping()
    selector_keys = _SELECTOR_KEYS & entries.keys()
    if not selector_keys:  # the brief's plain map, or {}
        return LabelSelector(tuple(sorted(parse_labels(field).items())))
    if len(selector_keys) != len(entries):
        plain = sorted(entries.keys() - _SELECTOR_KEYS)
        raise entries[plain[0]].error(
            "a selector is either matchLabels/matchExpressions or a plain label map, not both"
        )
    labels = parse_labels(entries["matchLabels"]) if "matchLabels" in entries else {}
    expressions = (
        [_requirement(item) for item in entries["matchExpressions"].optional_sequence()]
        if "matchExpressions" in entries
        else []
    )
    return LabelSelector(tuple(sorted(labels.items())), tuple(expressions))


def _requirement(field: Field) -> Requirement:
    entries = field.mapping(_EXPRESSION_KEYS)
    for required in ("key", "operator"):
        if required not in entries:
            raise field.error(f"{required} is required")
    key = entries["key"].string()
    check_label_key(entries["key"], key)
    operator_text = entries["operator"].string()
    try:
        operator = Operator(operator_text)
    except ValueError:
        raise entries["operator"].error(
            f"{operator_text!r} is not an operator; use one of: "
            + ", ".join(op.value for op in Operator)
        ) from None
    values_field = entries.get("values")
    values: list[str] = []
    for item in values_field.optional_sequence() if values_field is not None else []:
        value = item.string()
        check_label_value(item, value)
        values.append(value)
    if operator in (Operator.IN, Operator.NOT_IN) and not values:
        raise (values_field or field).error(f"operator {operator.value} needs at least one value")
    if operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
        assert values_field is not None
        raise values_field.error(f"operator {operator.value} takes no values")
    return Requirement(key, operator, frozenset(values))
