"""Nova's key space in the store (operators read these keys in the Consul UI).

```
nova/v1/coordinator/leader         the coordinator lock (session-bound)
nova/v1/nodes/<node>               inventory + capacity (agent-owned)
nova/v1/namespaces/<ns>            quota, limits, segment id, isolation mode
nova/v1/deployments/<ns>/<name>    desired spec + rollout state
nova/v1/assignments/<node>         what the node must run (coordinator-owned)
nova/v1/status/<node>/...          observed state (agent-owned)
nova/v1/policies/<ns>/<name>       cluster-wide network policies
nova/v1/images/<digest>/...        content-addressed images (meta, chunk/<i>)
nova/v1/imagetags/<name>/<tag>     image tag -> {"digest": …}
nova/v1/containers/<node>/<id>     the local agent's own container records
nova/v1/replicas/<node>/<replica>  the local agent's replica -> container mapping
nova/v1/ipam/<node>                a node's container addresses (agent-owned; ipam.py)
nova/v1/endpoints/<node>           its running containers' ip, namespace, labels (policy peers)
```

Prefix constants end with '/', so `list(NODES)` never matches a sibling such
as `nova/v1/nodesX`. Builders validate every path segment and raise
ValueError naming the segment: a user-typed name can never escape its
directory or collide with another kind.
"""

from __future__ import annotations

import re

ROOT = "nova/v1/"
LEADER = ROOT + "coordinator/leader"
NODES = ROOT + "nodes/"
NAMESPACES = ROOT + "namespaces/"
DEPLOYMENTS = ROOT + "deployments/"
ASSIGNMENTS = ROOT + "assignments/"
STATUS = ROOT + "status/"
POLICIES = ROOT + "policies/"
IMAGES = ROOT + "images/"
IMAGE_TAGS = ROOT + "imagetags/"
ENDPOINTS = ROOT + "endpoints/"
REPLICAS = ROOT + "replicas/"
CONTAINERS = ROOT + "containers/"

MAX_SEGMENT = 253
# Letters, digits, '.', '_', '-'; starts and ends with a letter or digit.
# That admits DNS labels and subdomains, hostnames and generated ids.
_SEGMENT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
# OCI digest: algorithm ":" encoded, e.g. sha256:<64 hex>.
_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[A-Za-z0-9=_-]{32,}")


def segment(value: str, *, what: str = "name") -> str:
    """`value` if it is a valid single path segment, else ValueError saying why."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if "/" in value:
        raise ValueError(f"{what} {value!r} must not contain '/'")
    if len(value) > MAX_SEGMENT or not _SEGMENT.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is invalid: use at most {MAX_SEGMENT} letters, digits, "
            "'.', '_' or '-', starting and ending with a letter or digit"
        )
    return value


def digest(value: str) -> str:
    """`value` if it is an OCI content digest such as `sha256:<hex>`."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise ValueError(
            f"image digest {value!r} is invalid: expected <algorithm>:<hex>, e.g. sha256:…"
        )
    return value


def endpoints(node_name: str) -> str:
    return ENDPOINTS + segment(node_name, what="node name")


def node(name: str) -> str:
    return NODES + segment(name, what="node name")


def namespace(ns: str) -> str:
    return NAMESPACES + segment(ns, what="namespace")


def deployments_in(ns: str) -> str:
    return f"{DEPLOYMENTS}{segment(ns, what='namespace')}/"


def deployment(ns: str, name: str) -> str:
    return deployments_in(ns) + segment(name, what="deployment name")


def assignment(node_name: str) -> str:
    return ASSIGNMENTS + segment(node_name, what="node name")


def status_of(node_name: str) -> str:
    """The prefix holding everything `node_name` reports."""
    return f"{STATUS}{segment(node_name, what='node name')}/"


def status(node_name: str, *parts: str) -> str:
    """`nova/v1/status/<node>/<part>/...`: at least one part."""
    if not parts:
        raise ValueError("status key needs at least one part below the node")
    return status_of(node_name) + "/".join(segment(part, what="status key part") for part in parts)


def policies_in(ns: str) -> str:
    return f"{POLICIES}{segment(ns, what='namespace')}/"


def policy(ns: str, name: str) -> str:
    return policies_in(ns) + segment(name, what="policy name")


def image(image_digest: str, *parts: str) -> str:
    """`nova/v1/images/<digest>`, or a key below it with `parts`."""
    key = IMAGES + digest(image_digest)
    return "/".join([key, *(segment(part, what="image key part") for part in parts)])


def image_tags_of(name: str) -> str:
    """The prefix holding every tag of image `name`."""
    return f"{IMAGE_TAGS}{segment(name, what='image name')}/"


def image_tag(name: str, tag: str) -> str:
    return image_tags_of(name) + segment(tag, what="image tag")


def replicas_on(node_name: str) -> str:
    return f"{REPLICAS}{segment(node_name, what='node name')}/"


def replica(node_name: str, replica_id: str) -> str:
    return replicas_on(node_name) + segment(replica_id, what="replica id")


def containers_on(node_name: str) -> str:
    return f"{CONTAINERS}{segment(node_name, what='node name')}/"


def container(node_name: str, container_id: str) -> str:
    return containers_on(node_name) + segment(container_id, what="container id")


def split(key: str, prefix: str) -> tuple[str, ...]:
    """The segments of `key` below `prefix`: split('nova/v1/nodes/a', NODES) == ('a',)."""
    if not key.startswith(prefix) or len(key) == len(prefix):
        raise ValueError(f"store key {key!r} is not below {prefix!r}")
    return tuple(key[len(prefix) :].split("/"))
