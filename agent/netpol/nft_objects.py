"""The nftables tables Nova wants, as objects, and the transactions that get them there.

Pure (unit-tested without root in tests/unit/test_netpol_nft_objects.py).
A `Ruleset` is the desired content of Nova's tables: counter objects,
chains (with their rules) and sets/maps (with their elements), each keyed
by (family, name). Two documents come out of it:

- `replace_document(new)`: delete and re-create both tables in one
  transaction (the first apply of a process, and the fallback);
- `update_document(old, new)`: only what differs, in one transaction: new
  objects added, changed chains flushed and refilled, set and map elements
  deleted and added one by one, objects that are gone deleted. A change of
  one policy among 1,000 rules then sends a few elements to the kernel
  instead of every chain and map again, and the counter objects of policies
  that stay keep counting.

Order inside an update matters to the kernel: a chain must exist before a
map element or rule refers to it, and a map or chain can only be deleted
once nothing refers to it any more.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

Json = dict[str, Any]
Key = tuple[str, str]  # (family, name)


def canonical(value: Any) -> str:
    """One spelling per JSON value, so equal rules and elements compare equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass
class Chain:
    """A chain: `decl` holds the base chain's hook fields (empty for a regular chain)."""

    decl: Json = field(default_factory=dict)
    rules: list[list[Json]] = field(default_factory=list)  # each rule's `expr`

    def signature(self) -> tuple[str, tuple[str, ...]]:
        return canonical(self.decl), tuple(canonical(rule) for rule in self.rules)


@dataclass
class Collection:
    """A set (`decl` without "map") or a map; elements by an identity that tells
    equal elements apart from different ones (by default their canonical spelling)."""

    decl: Json
    elements: dict[Hashable, Any] = field(default_factory=dict)

    @property
    def is_map(self) -> bool:
        return "map" in self.decl

    def add(self, element: Any, identity: Hashable | None = None) -> None:
        """`identity`: a cheaper key than the JSON spelling (10,000 elements are
        spelled in ~0.1 s), which must determine the whole element, verdict included."""
        self.elements[canonical(element) if identity is None else identity] = element

    def key_of(self, element: Any) -> Any:
        return element[0] if self.is_map else element


@dataclass
class Ruleset:
    """What Nova's tables (one name, several families) should contain."""

    table: str
    families: tuple[str, ...]
    counters: dict[Key, None] = field(default_factory=dict)  # ordered set
    chains: dict[Key, Chain] = field(default_factory=dict)
    collections: dict[Key, Collection] = field(default_factory=dict)

    def counter(self, family: str, name: str) -> None:
        self.counters[family, name] = None

    def chain(self, family: str, name: str, **decl: Any) -> Chain:
        return self.chains.setdefault((family, name), Chain(decl=decl))

    def collection(self, family: str, name: str, **decl: Any) -> Collection:
        return self.collections.setdefault((family, name), Collection(decl=decl))


def _obj(ruleset: Ruleset, key: Key, **body: Any) -> Json:
    family, name = key
    return {"family": family, "table": ruleset.table, "name": name, **body}


def _kind(collection: Collection) -> str:
    return "map" if collection.is_map else "set"


def _elements(ruleset: Ruleset, key: Key, elements: list[Any]) -> Json:
    family, name = key
    return {"family": family, "table": ruleset.table, "name": name, "elem": elements}


def _rule(ruleset: Ruleset, key: Key, expr: list[Json]) -> Json:
    family, name = key
    return {
        "add": {"rule": {"family": family, "table": ruleset.table, "chain": name, "expr": expr}}
    }


def replace_document(new: Ruleset) -> Json:
    """One transaction that replaces Nova's tables with `new` (counters start at 0):
    re-create the tables empty, then the update from nothing to `new`."""
    cmds: list[Json] = []
    for family in new.families:
        table = {"family": family, "name": new.table}
        cmds += [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
    fill = update_document(Ruleset(table=new.table, families=new.families), new)
    assert fill is not None  # nothing declared before: no declaration can differ
    return {"nftables": cmds + fill["nftables"]}


def update_document(old: Ruleset, new: Ruleset) -> Json | None:
    """One transaction that turns tables holding `old` into `new`.

    Empty when nothing differs; None when an object's declaration changed
    (its type or hook), which only a replacement can do.
    """
    if (old.table, old.families) != (new.table, new.families):
        return None
    for key in old.chains.keys() & new.chains.keys():
        if canonical(old.chains[key].decl) != canonical(new.chains[key].decl):
            return None
    for key in old.collections.keys() & new.collections.keys():
        if canonical(old.collections[key].decl) != canonical(new.collections[key].decl):
            return None

    new_chains = [k for k in new.chains if k not in old.chains]
    gone_chains = [k for k in old.chains if k not in new.chains]
    changed_chains = [
        k
        for k in new.chains
        if k in old.chains and old.chains[k].signature() != new.chains[k].signature()
    ]
    new_collections = [k for k in new.collections if k not in old.collections]
    gone_collections = [k for k in old.collections if k not in new.collections]
    kept_collections = [k for k in new.collections if k in old.collections]

    cmds: list[Json] = [
        {"add": {"counter": _obj(new, key)}} for key in new.counters if key not in old.counters
    ]
    # 1. new chains and maps exist (empty) before anything refers to them
    for key in new_chains:
        cmds.append({"add": {"chain": _obj(new, key, **new.chains[key].decl)}})
    for key in new_collections:
        collection = new.collections[key]
        cmds.append({"add": {_kind(collection): _obj(new, key, **collection.decl)}})
    # 2. rules that change or go release the maps they refer to
    for key in changed_chains + gone_chains:
        cmds.append({"flush": {"chain": _obj(old, key)}})
    # 3. elements: the old ones that are not wanted go first (intervals never overlap)
    for key in kept_collections:
        before, after = old.collections[key], new.collections[key]
        gone = [before.key_of(e) for s, e in before.elements.items() if s not in after.elements]
        if gone:
            cmds.append({"delete": {"element": _elements(new, key, gone)}})
    for key in kept_collections + new_collections:
        before_elements = old.collections[key].elements if key in old.collections else {}
        added = [e for s, e in new.collections[key].elements.items() if s not in before_elements]
        if added:
            cmds.append({"add": {"element": _elements(new, key, added)}})
    # 4. rules of new and changed chains, now that their maps hold what they should
    for key in new_chains + changed_chains:
        cmds += [_rule(new, key, expr) for expr in new.chains[key].rules]
    # 5. what is gone: maps first (their elements jump to chains), then chains
    for key in gone_collections:
        cmds.append({"delete": {_kind(old.collections[key]): _obj(old, key)}})
    for key in gone_chains:
        cmds.append({"delete": {"chain": _obj(old, key)}})
    # 6. counter objects no rule names any more (a deleted policy's)
    cmds += [
        {"delete": {"counter": _obj(old, key)}} for key in old.counters if key not in new.counters
    ]
    return {"nftables": cmds}
