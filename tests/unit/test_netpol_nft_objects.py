"""nft_objects: the order and content of replacement and update transactions.

The kernel side (an update leaves exactly what a replacement would) is
tests/linux/test_netpol_nft_update.py; here, the rules the kernel imposes on
the order of commands inside one transaction.
"""

from __future__ import annotations

from typing import Any

from agent.netpol.nft_objects import Ruleset, canonical, replace_document, update_document


def ruleset(*, policy_target: str = "p0", with_p1: bool = False, elements: int = 2) -> Ruleset:
    rs = Ruleset(table="nova", families=("inet", "bridge"))
    rs.counter("inet", "c0")
    rs.chain(
        "inet", "forward", type="filter", hook="forward", prio=0, policy="accept"
    ).rules.append(
        [{"vmap": {"key": {"payload": {"protocol": "ip", "field": "daddr"}}, "data": "@ingress"}}]
    )
    rs.chain("inet", "p0").rules.append([{"counter": "c0"}, {"return": None}])
    if with_p1:
        rs.counter("inet", "c1")
        rs.chain("inet", "p1").rules.append([{"counter": "c1"}, {"return": None}])
    vmap = rs.collection("inet", "ingress", type="ipv4_addr", map="verdict", flags=["interval"])
    for n in range(elements):
        vmap.add([f"10.0.0.{n}", {"goto": {"target": policy_target if n == 0 else "p0"}}])
    rs.collection("bridge", "ports", type="ifname").add("veth0")
    return rs


def ops(document: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(verb, kind, name or chain) of each command."""
    out = []
    for cmd in document["nftables"]:
        ((verb, body),) = cmd.items()
        ((kind, obj),) = body.items()
        out.append((verb, kind, obj.get("name", obj.get("chain", ""))))
    return out


def test_nothing_changed_is_an_empty_update() -> None:
    assert update_document(ruleset(), ruleset()) == {"nftables": []}


def test_replacement_recreates_both_tables_then_declares_before_use() -> None:
    got = ops(replace_document(ruleset(with_p1=True)))
    assert (
        got[:6]
        == [
            ("add", "table", "nova"),
            ("delete", "table", "nova"),
            ("add", "table", "nova"),
        ]
        * 2
    )
    first = {entry: n for n, entry in reversed(list(enumerate(got)))}
    assert first["add", "counter", "c1"] < first["add", "rule", "p1"]
    assert first["add", "chain", "p1"] < first["add", "element", "ingress"]
    assert first["add", "map", "ingress"] < first["add", "rule", "forward"]


def test_an_added_element_is_the_only_command() -> None:
    doc = update_document(ruleset(), ruleset(elements=3))
    assert doc == {
        "nftables": [
            {
                "add": {
                    "element": {
                        "family": "inet",
                        "table": "nova",
                        "name": "ingress",
                        "elem": [["10.0.0.2", {"goto": {"target": "p0"}}]],
                    }
                }
            }
        ]
    }


def test_a_repointed_element_is_deleted_by_key_then_added_after_its_new_chain() -> None:
    doc = update_document(ruleset(), ruleset(policy_target="p1", with_p1=True))
    assert doc is not None
    got = ops(doc)
    assert got == [
        ("add", "counter", "c1"),
        ("add", "chain", "p1"),
        ("delete", "element", "ingress"),
        ("add", "element", "ingress"),
        ("add", "rule", "p1"),
    ]
    deleted = doc["nftables"][2]["delete"]["element"]["elem"]
    assert deleted == ["10.0.0.0"]  # a map element is deleted by its key alone


def test_a_gone_chain_is_released_before_it_is_deleted() -> None:
    doc = update_document(ruleset(policy_target="p1", with_p1=True), ruleset())
    assert doc is not None
    got = ops(doc)
    assert got.index(("flush", "chain", "p1")) < got.index(("delete", "chain", "p1"))
    assert got.index(("delete", "element", "ingress")) < got.index(("delete", "chain", "p1"))
    assert got[-1] == ("delete", "counter", "c1")  # after the rule naming it went


def test_a_gone_map_goes_before_the_chains_its_elements_jump_to() -> None:
    old = ruleset(with_p1=True)
    old.collection("inet", "e0_any", type="ipv4_addr", map="verdict").add(
        ["10.0.0.9", {"goto": {"target": "p1"}}]
    )
    old.chain("inet", "e0").rules.append([{"vmap": {"key": "x", "data": "@e0_any"}}])
    got = ops(update_document(old, ruleset()) or {"nftables": []})
    assert got.index(("flush", "chain", "e0")) < got.index(("delete", "map", "e0_any"))
    assert got.index(("delete", "map", "e0_any")) < got.index(("delete", "chain", "p1"))


def test_a_changed_chain_is_flushed_and_refilled() -> None:
    new = ruleset()
    new.chains["inet", "p0"].rules = [[{"counter": "c0"}, {"drop": None}]]
    doc = update_document(ruleset(), new)
    assert doc is not None
    assert ops(doc) == [("flush", "chain", "p0"), ("add", "rule", "p0")]
    assert doc["nftables"][1]["add"]["rule"]["expr"][1] == {"drop": None}


def test_a_changed_declaration_needs_a_replacement() -> None:
    new = ruleset()
    new.chains["inet", "forward"].decl["prio"] = 10
    assert update_document(ruleset(), new) is None
    other = ruleset()
    other.collections["bridge", "ports"].decl["type"] = "ipv4_addr"
    assert update_document(ruleset(), other) is None


def test_canonical_ignores_key_order() -> None:
    assert canonical({"a": 1, "b": [1, {"c": 2, "d": 3}]}) == canonical(
        {"b": [1, {"d": 3, "c": 2}], "a": 1}
    )
