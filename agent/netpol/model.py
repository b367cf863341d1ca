"""`apiVersion: nova.sh/v1, kind: NetworkPolicy`: the parsed model and its validation.

`parse_policies(text, source)` reads a YAML file (several documents allowed)
and returns its policies, or raises `PolicyError` naming the file, the line
and the field: `policies/web.yaml:14: spec.ingress[0].ports[1].port: 70000 is
not a port`. Validation is Kubernetes' own (networking/v1), plus: unknown and
duplicate fields are errors, `spec.podSelector` is required, named ports are
refused (Nova containers declare none). docs/network-policy.md is the manual.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network

from agent.netpol.selectors import (
    DNS_SUBDOMAIN,
    SELECT_ALL,
    LabelSelector,
    parse_labels,
    parse_selector,
)
from agent.netpol.tables import IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, PortMatch
from agent.netpol.yamltree import Field, PolicyError, documents

API_VERSION = "nova.sh/v1"
KIND = "NetworkPolicy"
DEFAULT_NAMESPACE = "default"
PROTOCOLS = {"TCP": IPPROTO_TCP, "UDP": IPPROTO_UDP, "SCTP": IPPROTO_SCTP}

_TOP_KEYS = frozenset({"apiVersion", "kind", "metadata", "spec"})
_METADATA_KEYS = frozenset({"name", "namespace", "labels", "annotations"})
_SPEC_KEYS = frozenset({"podSelector", "policyTypes", "ingress", "egress"})
_PEER_KEYS = frozenset({"podSelector", "namespaceSelector", "ipBlock"})
_PORT_KEYS = frozenset({"protocol", "port", "endPort"})
_IPBLOCK_KEYS = frozenset({"cidr", "except"})
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?")

IPNetwork = IPv4Network | IPv6Network


@dataclass(frozen=True, slots=True)
class IPBlock:
    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class Peer:
    """One entry of `from`/`to`. Selectors given together must both hold (AND)."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True, slots=True)
class PolicyRule:
    peers: tuple[Peer, ...] = ()  # empty: every peer (`from`/`to` absent or [])
    ports: tuple[PortMatch, ...] = ()  # empty: every protocol and port


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector
    ingress: tuple[PolicyRule, ...]
    egress: tuple[PolicyRule, ...]
    affects_ingress: bool  # "Ingress" in policyTypes (after Kubernetes' defaulting)
    affects_egress: bool
    source: str = ""  # file or store key it came from
    line: int = 0  # line of its document in `source`

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_policies(
    text: str, source: str, *, default_namespace: str = DEFAULT_NAMESPACE
) -> list[NetworkPolicy]:
    """Every policy of a YAML text; PolicyError on the first problem (nothing partial)."""
    policies: list[NetworkPolicy] = []
    seen: dict[str, int] = {}
    for doc in documents(text, source):
        policy = parse_policy(doc, default_namespace)
        if policy.key in seen:
            raise doc.error(
                f"policy {policy.key} is defined twice in this file (first at line "
                f"{seen[policy.key]})"
            )
        seen[policy.key] = policy.line
        policies.append(policy)
    return policies


def parse_policy(doc: Field, default_namespace: str = DEFAULT_NAMESPACE) -> NetworkPolicy:
    top = doc.mapping(_TOP_KEYS)
    for required in ("apiVersion", "kind", "metadata", "spec"):
        if required not in top:
            raise doc.error(f"{required} is required")
    api_version = top["apiVersion"].string()
    if api_version != API_VERSION:
        raise top["apiVersion"].error(f"expected {API_VERSION}, got {api_version!r}")
    kind = top["kind"].string()
    if kind != KIND:
        raise top["kind"].error(f"expected {KIND}, got {kind!r}")
    namespace, name = _metadata(top["metadata"], default_namespace)
    spec = top["spec"].mapping(_SPEC_KEYS)
    if "podSelector" not in spec or spec["podSelector"].is_null:
        raise top["spec"].error(
            "podSelector is required (use `podSelector: {}` to select every container "
            "of the namespace)"
        )
    ingress = _rules(spec.get("ingress"), "from")
    egress = _rules(spec.get("egress"), "to")
    affects_ingress, affects_egress = _policy_types(spec.get("policyTypes"), bool(egress))
    return NetworkPolicy(
        namespace=namespace,
        name=name,
        pod_selector=parse_selector(spec["podSelector"]),
        ingress=ingress,
        egress=egress,
        affects_ingress=affects_ingress,
        affects_egress=affects_egress,
        source=doc.source,
        line=doc.line,
    )


def _metadata(field: Field, default_namespace: str) -> tuple[str, str]:
    meta = field.mapping(_METADATA_KEYS)
    if "name" not in meta:
        raise field.error("name is required")
    name = meta["name"].string()
    if len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
        raise meta["name"].error(
            f"{name!r} is not a valid name: lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit, at most 253"
        )
    namespace = default_namespace
    if "namespace" in meta:
        namespace = meta["namespace"].string()
        if len(namespace) > 63 or not _DNS_LABEL.fullmatch(namespace):
            raise meta["namespace"].error(
                f"{namespace!r} is not a valid namespace: lower-case letters, digits and "
                "'-', starting and ending with a letter or digit, at most 63"
            )
    if "labels" in meta:
        parse_labels(meta["labels"])
    if "annotations" in meta:
        meta["annotations"].string_map()
    return namespace, name


def _policy_types(field: Field | None, has_egress_rules: bool) -> tuple[bool, bool]:
    """Kubernetes' defaulting: unset or [] means Ingress, plus Egress if egress rules exist."""
    items = field.optional_sequence() if field is not None else []
    if not items:
        return True, has_egress_rules
    seen: set[str] = set()
    for item in items:
        value = item.string()
        if value not in ("Ingress", "Egress"):
            raise item.error(f"{value!r} is not a policy type; use Ingress or Egress")
        if value in seen:
            raise item.error(f"{value} is listed twice")
        seen.add(value)
    return "Ingress" in seen, "Egress" in seen


def _rules(field: Field | None, peers_key: str) -> tuple[PolicyRule, ...]:
    if field is None:
        return ()
    rules: list[PolicyRule] = []
    for item in field.optional_sequence():
        entries = item.mapping(frozenset({peers_key, "ports"})) if not item.is_null else {}
        peers_field = entries.get(peers_key)
        ports_field = entries.get("ports")
        peers = [_peer(p) for p in peers_field.optional_sequence()] if peers_field else []
        ports = [_port(p) for p in ports_field.optional_sequence()] if ports_field else []
        rules.append(PolicyRule(tuple(peers), tuple(ports)))
    return tuple(rules)


def _peer(field: Field) -> Peer:
    entries = {k: v for k, v in field.mapping(_PEER_KEYS).items() if not v.is_null}
    if not entries:
        raise field.error("a peer needs podSelector, namespaceSelector or ipBlock")
    if "ipBlock" in entries and len(entries) > 1:
        raise entries["ipBlock"].error(
            "ipBlock cannot be combined with podSelector or namespaceSelector in one peer; "
            "write them as separate peers"
        )
    if "ipBlock" in entries:
        return Peer(ip_block=_ip_block(entries["ipBlock"]))
    pods = entries.get("podSelector")
    namespaces = entries.get("namespaceSelector")
    return Peer(
        pod_selector=parse_selector(pods) if pods is not None else None,
        namespace_selector=parse_selector(namespaces) if namespaces is not None else None,
    )


def _network(field: Field) -> IPNetwork:
    text = field.string()
    if "/" not in text:
        raise field.error(f"{text!r} is not a CIDR (write e.g. {text}/32)")
    try:
        return ip_network(text, strict=False)  # host bits are masked, as Kubernetes does
    except ValueError:
        raise field.error(f"{text!r} is not a CIDR") from None


def _ip_block(field: Field) -> IPBlock:
    entries = field.mapping(_IPBLOCK_KEYS)
    if "cidr" not in entries:
        raise field.error("cidr is required")
    cidr = _network(entries["cidr"])
    excepts: list[IPNetwork] = []
    for item in entries["except"].optional_sequence() if "except" in entries else []:
        excluded = _network(item)
        if (
            excluded.version != cidr.version
            or not excluded.subnet_of(cidr)  # type: ignore[arg-type]
            or excluded.prefixlen <= cidr.prefixlen
        ):
            raise item.error(f"{excluded} is not strictly inside cidr {cidr}")
        excepts.append(excluded)
    return IPBlock(cidr, tuple(excepts))


def _port(field: Field) -> PortMatch:
    entries = field.mapping(_PORT_KEYS) if not field.is_null else {}
    protocol = IPPROTO_TCP
    if "protocol" in entries:
        text = entries["protocol"].string()
        if text not in PROTOCOLS:
            raise entries["protocol"].error(
                f"{text!r} is not a protocol; use TCP, UDP or SCTP (upper case)"
            )
        protocol = PROTOCOLS[text]
    if "port" not in entries or entries["port"].is_null:
        if "endPort" in entries:
            raise entries["endPort"].error("endPort needs port (the first port of the range)")
        return PortMatch(protocol, 1, 65535)
    port_field = entries["port"]
    port = port_field.string_or_integer()
    if isinstance(port, str):
        if port.isdigit():
            raise port_field.error(f"{port!r} is quoted: write the port as a number")
        raise port_field.error(
            f"named port {port!r} is not supported (Nova containers declare no port "
            "names): use the port number"
        )
    if not 1 <= port <= 65535:
        raise port_field.error(f"{port} is not a port")
    last = port
    if "endPort" in entries and not entries["endPort"].is_null:
        last = entries["endPort"].integer()
        if not 1 <= last <= 65535:
            raise entries["endPort"].error(f"{last} is not a port")
        if last < port:
            raise entries["endPort"].error(f"{last} is below port {port}")
    return PortMatch(protocol, port, last)


__all__ = [
    "API_VERSION",
    "KIND",
    "SELECT_ALL",
    "IPBlock",
    "LabelSelector",
    "NetworkPolicy",
    "Peer",
    "PolicyError",
    "PolicyRule",
    "parse_policies",
]
