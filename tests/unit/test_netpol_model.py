"""NetworkPolicy parsing and validation: what operators write, and the errors they get."""

from __future__ import annotations

import textwrap
from ipaddress import ip_network

import pytest

from agent.netpol.model import IPBlock, Peer, PolicyError, PolicyRule, parse_policies
from agent.netpol.selectors import LabelSelector, Operator, Requirement
from agent.netpol.tables import IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, PortMatch

HEADER = "apiVersion: nova.sh/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n"


def parse(text: str, source: str = "policies/web.yaml") -> list:  # type: ignore[type-arg]
    return parse_policies(textwrap.dedent(text), source)


def spec(body: str) -> str:
    """A policy named p in namespace default with `body` (indented YAML) as its spec."""
    return HEADER + "spec:\n" + textwrap.indent(textwrap.dedent(body), "  ")


def error_of(text: str) -> str:
    with pytest.raises(PolicyError) as caught:
        parse_policies(text, "policies/web.yaml")
    return caught.value.message


BRIEF_EXAMPLE = """\
# network-policy.yaml
apiVersion: nova.sh/v1
kind: NetworkPolicy
metadata:
  name: web-tier-policy
spec:
  podSelector:
    tier: web
  ingress:
    - from:
      - podSelector:
          tier: frontend
      ports:
        - protocol: TCP
          port: 8080
  egress:
    - to:
      - podSelector:
          tier: database
      ports:
        - protocol: TCP
          port: 5432
"""


def test_the_brief_example_parses_with_plain_label_maps() -> None:
    (policy,) = parse_policies(BRIEF_EXAMPLE, "network-policy.yaml")
    assert policy.key == "default/web-tier-policy"
    assert policy.pod_selector == LabelSelector((("tier", "web"),))
    assert policy.affects_ingress and policy.affects_egress  # egress rules imply Egress
    assert policy.ingress == (
        PolicyRule(
            (Peer(pod_selector=LabelSelector((("tier", "frontend"),))),),
            (PortMatch(IPPROTO_TCP, 8080, 8080),),
        ),
    )
    assert policy.egress[0].ports == (PortMatch(IPPROTO_TCP, 5432, 5432),)
    assert policy.source == "network-policy.yaml" and policy.line == 2


def test_the_issue_example_error_names_file_line_and_field() -> None:
    text = spec("""\
        podSelector: {}
        ingress:
          - ports:
              - port: 80
              - port: 70000
        """)
    assert (
        error_of(text) == "policies/web.yaml:10: spec.ingress[0].ports[1].port: 70000 is not a port"
    )


def test_kubernetes_selectors_with_every_operator() -> None:
    (policy,) = parse(
        spec("""\
        podSelector:
          matchLabels: {app: web}
          matchExpressions:
            - {key: env, operator: In, values: [prod, staging]}
            - {key: tier, operator: NotIn, values: [db]}
            - {key: example.com/canary, operator: Exists}
            - {key: legacy, operator: DoesNotExist}
        """)
    )
    selector = policy.pod_selector
    assert selector.match_labels == (("app", "web"),)
    assert selector.match_expressions == (
        Requirement("env", Operator.IN, frozenset({"prod", "staging"})),
        Requirement("tier", Operator.NOT_IN, frozenset({"db"})),
        Requirement("example.com/canary", Operator.EXISTS),
        Requirement("legacy", Operator.DOES_NOT_EXIST),
    )
    base = {"app": "web", "env": "prod", "example.com/canary": "1"}
    assert selector.matches(base)
    assert not selector.matches({**base, "env": "dev"})
    assert not selector.matches({**base, "tier": "db"})
    assert not selector.matches({k: v for k, v in base.items() if k != "example.com/canary"})
    assert not selector.matches({**base, "legacy": ""})
    assert not selector.matches({**base, "app": "api"})


def test_notin_matches_containers_without_the_label() -> None:
    requirement = Requirement("tier", Operator.NOT_IN, frozenset({"db"}))
    assert requirement.matches({})
    assert requirement.matches({"tier": "web"})
    assert not requirement.matches({"tier": "db"})


def test_empty_selector_selects_everything() -> None:
    (policy,) = parse(spec("podSelector: {}\n"))
    assert policy.pod_selector.selects_all
    assert policy.pod_selector.matches({}) and policy.pod_selector.matches({"a": "b"})


@pytest.mark.parametrize(
    ("body", "ingress", "egress"),
    [
        ("podSelector: {}\n", True, False),
        ("podSelector: {}\negress: [{}]\n", True, True),
        ("podSelector: {}\negress: []\n", True, False),  # only non-empty egress implies Egress
        ("podSelector: {}\npolicyTypes: []\negress: [{}]\n", True, True),
        ("podSelector: {}\npolicyTypes: [Egress]\n", False, True),
        ("podSelector: {}\npolicyTypes: [Egress]\ningress: [{}]\n", False, True),
        ("podSelector: {}\npolicyTypes: [Ingress, Egress]\n", True, True),
    ],
)
def test_policy_types_default_as_kubernetes(body: str, ingress: bool, egress: bool) -> None:
    (policy,) = parse(spec(body))
    assert (policy.affects_ingress, policy.affects_egress) == (ingress, egress)


def test_empty_and_absent_from_mean_every_peer_and_absent_ports_every_port() -> None:
    (policy,) = parse(
        spec("""\
        podSelector: {}
        ingress:
          - {}
          - from: []
          - from:
        """)
    )
    assert policy.ingress == (PolicyRule(), PolicyRule(), PolicyRule())


def test_peers_ports_and_ip_blocks() -> None:
    (policy,) = parse(
        spec("""\
        podSelector: {}
        egress:
          - to:
              - namespaceSelector: {matchLabels: {team: a}}
                podSelector: {matchLabels: {app: db}}
              - namespaceSelector: {}
              - ipBlock:
                  cidr: 10.0.0.0/8
                  except: [10.1.0.0/16, 10.2.3.4/32]
            ports:
              - {protocol: UDP, port: 53}
              - {protocol: SCTP}
              - {port: 8000, endPort: 8080}
        """)
    )
    (rule,) = policy.egress
    assert rule.peers == (
        Peer(
            pod_selector=LabelSelector((("app", "db"),)),
            namespace_selector=LabelSelector((("team", "a"),)),
        ),
        Peer(namespace_selector=LabelSelector()),
        Peer(
            ip_block=IPBlock(
                ip_network("10.0.0.0/8"), (ip_network("10.1.0.0/16"), ip_network("10.2.3.4/32"))
            )
        ),
    )
    assert rule.ports == (
        PortMatch(IPPROTO_UDP, 53, 53),
        PortMatch(IPPROTO_SCTP, 1, 65535),
        PortMatch(IPPROTO_TCP, 8000, 8080),
    )


def test_multi_document_files_and_namespaces() -> None:
    text = (
        "---\n"
        + HEADER
        + "  namespace: x\nspec: {podSelector: {}}\n---\n---\n"
        + HEADER.replace("name: p", "name: q")
        + "spec: {podSelector: {}}\n"
    )
    first, second = parse_policies(text, "f.yaml")
    assert (first.key, first.line) == ("x/p", 2)
    assert (second.key, second.line) == ("default/q", 10)


def test_an_empty_file_holds_no_policies() -> None:
    assert parse_policies("", "f.yaml") == []
    assert parse_policies("# nothing yet\n---\n", "f.yaml") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: b\nc: [\n", "policies/web.yaml:3: not valid YAML"),
        ("- 1\n", "policies/web.yaml:1: expected a mapping, got a list"),
        (
            HEADER + "spec: {podSelector: {}}\nstatus: {}\n",
            "policies/web.yaml:6: status: unknown field; expected one of: apiVersion, kind, "
            "metadata, spec",
        ),
        (
            HEADER.replace("nova.sh/v1", "networking.k8s.io/v1") + "spec: {podSelector: {}}\n",
            "policies/web.yaml:1: apiVersion: expected nova.sh/v1, got 'networking.k8s.io/v1'",
        ),
        (
            HEADER.replace("NetworkPolicy", "Deployment") + "spec: {podSelector: {}}\n",
            "policies/web.yaml:2: kind: expected NetworkPolicy, got 'Deployment'",
        ),
        (
            HEADER + "spec: {}\n",
            "policies/web.yaml:5: spec: podSelector is required (use `podSelector: {}`",
        ),
        (
            HEADER.replace("name: p", "name: Web_1") + "spec: {podSelector: {}}\n",
            "policies/web.yaml:4: metadata.name: 'Web_1' is not a valid name",
        ),
        (
            HEADER + "  namespace: a.b\nspec: {podSelector: {}}\n",
            "policies/web.yaml:5: metadata.namespace: 'a.b' is not a valid namespace",
        ),
        (
            HEADER + "spec: {podSelector: {}, ingres: []}\n",
            "policies/web.yaml:5: spec.ingres: unknown field; expected one of: egress, ingress, "
            "podSelector, policyTypes",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  podSelector: {}\n",
            "policies/web.yaml:7: spec.podSelector: duplicate key (first at line 6)",
        ),
        (
            HEADER + "spec:\n  podSelector: {version: 1}\n",
            "spec.podSelector.version: expected a string",
        ),
        (
            HEADER + "spec:\n  podSelector: {matchLabels: {a: b}, tier: web}\n",
            "spec.podSelector.tier: a selector is either matchLabels/matchExpressions or a plain",
        ),
        (HEADER + "spec:\n  podSelector: {'-bad': x}\n", "label key '-bad' is invalid"),
        (HEADER + "spec:\n  podSelector: {a: 'x y'}\n", "label value 'x y' is invalid"),
        (
            HEADER + "spec:\n  podSelector:\n    matchExpressions: [{key: a, operator: in}]\n",
            "policies/web.yaml:7: spec.podSelector.matchExpressions[0].operator: 'in' is not an "
            "operator; use one of: In, NotIn, Exists, DoesNotExist",
        ),
        (
            HEADER + "spec:\n  podSelector:\n    matchExpressions: [{key: a, operator: In}]\n",
            "spec.podSelector.matchExpressions[0]: operator In needs at least one value",
        ),
        (
            HEADER + "spec:\n  podSelector:\n    matchExpressions: [{key: a, operator: Exists, "
            "values: [x]}]\n",
            "spec.podSelector.matchExpressions[0].values: operator Exists takes no values",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  policyTypes: [Ingress, ingress]\n",
            "spec.policyTypes[1]: 'ingress' is not a policy type; use Ingress or Egress",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  policyTypes: [Egress, Egress]\n",
            "spec.policyTypes[1]: Egress is listed twice",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  ingress: [{to: []}]\n",
            "spec.ingress[0].to: unknown field; expected one of: from, ports",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  ingress: [{from: [{}]}]\n",
            "spec.ingress[0].from[0]: a peer needs podSelector, namespaceSelector or ipBlock",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  ingress: [{from: [{podSelector: {}, "
            "ipBlock: {cidr: 10.0.0.0/8}}]}]\n",
            "spec.ingress[0].from[0].ipBlock: ipBlock cannot be combined with podSelector",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.1}}]}]\n",
            "spec.egress[0].to[0].ipBlock.cidr: '10.0.0.1' is not a CIDR (write e.g. 10.0.0.1/32)",
        ),
        (
            HEADER
            + "spec:\n  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}]\n",
            "'10.0.0.0/33' is not a CIDR",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  egress: [{to: [{ipBlock: {except: []}}]}]\n",
            "spec.egress[0].to[0].ipBlock: cidr is required",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, "
            "except: [192.168.0.0/16]}}]}]\n",
            "spec.egress[0].to[0].ipBlock.except[0]: 192.168.0.0/16 is not strictly inside cidr "
            "10.0.0.0/8",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, "
            "except: [10.0.0.0/8]}}]}]\n",
            "10.0.0.0/8 is not strictly inside cidr 10.0.0.0/8",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  ingress: [{ports: [{protocol: tcp}]}]\n",
            "spec.ingress[0].ports[0].protocol: 'tcp' is not a protocol; use TCP, UDP or SCTP",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  ingress: [{ports: [{port: http}]}]\n",
            "spec.ingress[0].ports[0].port: named port 'http' is not supported",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  ingress: [{ports: [{port: '80'}]}]\n",
            "spec.ingress[0].ports[0].port: '80' is quoted: write the port as a number",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  ingress: [{ports: [{port: 0}]}]\n",
            "spec.ingress[0].ports[0].port: 0 is not a port",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  ingress: [{ports: [{port: 90, endPort: 80}]}]\n",
            "spec.ingress[0].ports[0].endPort: 80 is below port 90",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  ingress: [{ports: [{endPort: 80}]}]\n",
            "spec.ingress[0].ports[0].endPort: endPort needs port",
        ),
        (
            HEADER
            + "spec:\n  podSelector: {}\n  ingress: [{ports: [{port: 1, endPort: 65536}]}]\n",
            "spec.ingress[0].ports[0].endPort: 65536 is not a port",
        ),
        (
            HEADER + "spec:\n  podSelector: {}\n  ingress: [{ports: [{port: true}]}]\n",
            "expected a number or a name, got a boolean",
        ),
        (
            HEADER + "spec: {podSelector: {}}\n---\n" + HEADER + "spec: {podSelector: {}}\n",
            "policies/web.yaml:7: policy default/p is defined twice in this file (first at line 1)",
        ),
    ],
)
def test_errors_name_file_line_field_and_reason(text: str, expected: str) -> None:
    assert expected in error_of(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            HEADER + "spec: {podSelector: {}, ingress: [{ports: [{port: !foo 80}]}]}\n",
            "policies/web.yaml:5: spec.ingress[0].ports[0].port: cannot read this value: could "
            "not determine a constructor for the tag '!foo'",
        ),
        (
            HEADER + "spec: {podSelector: {a: !!python/object:os.system x}}\n",
            "policies/web.yaml:5: spec.podSelector.a: cannot read this value",
        ),
        ("a: " + "[" * 5000, "policies/web.yaml: not valid YAML"),
        # deeper than the C stack of libyaml's composer: refused before composing
        ("a: " + "[" * 200_000 + "]" * 200_000, "policies/web.yaml: not valid YAML: nested"),
        (
            "a:\n" + "".join(" " * i + "- \n" for i in range(100)),
            "policies/web.yaml: not valid YAML: nested",
        ),
    ],
)
def test_hostile_yaml_is_a_policy_error(text: str, expected: str) -> None:
    assert error_of(text).startswith(expected)


def test_one_bad_document_rejects_the_whole_file() -> None:
    text = HEADER + "spec: {podSelector: {}}\n---\n" + HEADER + "spec: {podSelector: 1}\n"
    assert "policies/web.yaml:11: spec.podSelector: expected a mapping, got a number" in error_of(
        text
    )


def test_ipv6_blocks_are_accepted_and_host_bits_masked() -> None:
    (policy,) = parse(
        spec("""\
        podSelector: {}
        egress:
          - to:
              - ipBlock: {cidr: 'fd00::/8', except: ['fd00::/16']}
              - ipBlock: {cidr: 10.0.0.7/24}
        """)
    )
    peers = policy.egress[0].peers
    assert peers[0].ip_block == IPBlock(ip_network("fd00::/8"), (ip_network("fd00::/16"),))
    assert peers[1].ip_block == IPBlock(ip_network("10.0.0.0/24"))
