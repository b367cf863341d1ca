"""`nova status` and `nova deploy`: the cluster, through any coordinator's API.

Every coordinator (leader or standby) serves the cluster API, so these
commands take a list of coordinator URLs and use the first that answers.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from agent.isolation.cgroups.parse import parse_millicores
from nova import errors
from nova.units import parse_size

DEFAULT_COORDINATOR = "http://127.0.0.1:8600"
TIMEOUT = 10.0

STATUS_DESCRIPTION = """\
Show the cluster: which coordinator leads and its epoch (the LockIndex of
nova/v1/coordinator/leader: it grows by one with every new leader), every
node with its health (healthy while its agent's session holds its node key),
capacity, labels and assigned replicas, and the leader's last placement pass.
"""

DEPLOY_DESCRIPTION = """\
Create or update a deployment: REPLICAS copies of an image, placed by the
leading coordinator on healthy nodes with room for them (CPU and memory are
not overcommitted), spread across nodes (and across the values of a node
label with --spread), only on nodes whose labels match every --constraint.
A replica on a node that fails is moved to another node within seconds.

Give the deployment with flags, or as a Deployment file (-f):

  apiVersion: nova.sh/v1
  kind: Deployment
  metadata: {name: web, namespace: default, labels: {app: web}}
  spec:
    image: web:1.0            # NAME:TAG (resolved now) or sha256:…
    replicas: 3
    resources: {cpu: 250m, memory: 64Mi}
    constraints: ["zone in (a,b)", "disk=ssd", "!gpu"]   # node labels (or {zone: a})
    spread: zone              # spread replicas across this node label
    args: ["--verbose"]
    env: {LOG: debug}
"""

DEPLOY_EPILOG = """\
examples:
  nova deploy web --image web:1.0 --replicas 3 --cpu 250m --memory 64Mi
  nova deploy batch --image myapp:latest --replicas 1000 --constraint disk=ssd \
      --constraint 'zone in (a,b)' --spread zone
  nova deploy -f web.yaml
  nova deploy web --delete

coordinators: --coordinator URL[,URL...], else $NOVA_COORDINATOR, else
http://127.0.0.1:8600; the first that answers is used.
exit status: 0 done; 2 usage error; 125 no coordinator answered or it refused.
"""


def add_parsers(commands: Any) -> None:
    """Register `nova status` and `nova deploy` on the `nova` subcommand parser."""
    raw = argparse.RawDescriptionHelpFormatter
    coordinator = argparse.ArgumentParser(add_help=False)
    coordinator.add_argument(
        "--coordinator",
        metavar="URL[,URL...]",
        help=f"coordinator API URLs (default: $NOVA_COORDINATOR or {DEFAULT_COORDINATOR})",
    )
    status = commands.add_parser(
        "status", parents=[coordinator], help="the cluster: leader, epoch, nodes",
        description=STATUS_DESCRIPTION, formatter_class=raw,
    )  # fmt: skip
    status.add_argument("--json", action="store_true", help="print the API's JSON")
    deploy = commands.add_parser(
        "deploy", parents=[coordinator], help="create or update a deployment",
        description=DEPLOY_DESCRIPTION, epilog=DEPLOY_EPILOG, formatter_class=raw,
    )  # fmt: skip
    deploy.add_argument("name", metavar="NAME", nargs="?", help="the deployment's name")
    deploy.add_argument("-f", "--file", type=Path, help="a Deployment YAML file")
    deploy.add_argument("--namespace", default=None, help="the namespace (default: default)")
    deploy.add_argument("--image", help="NAME:TAG or sha256:… (pushed with `nova image push`)")
    deploy.add_argument("--replicas", type=int, default=None, help="how many (default 1)")
    deploy.add_argument("--cpu", help="CPU per replica, e.g. 250m (default 100m)")
    deploy.add_argument("--memory", help="memory per replica, e.g. 64Mi (default 64Mi)")
    deploy.add_argument(
        "--constraint", action="append", default=[], metavar="EXPR",
        help="run only on nodes whose labels match: LABEL=VALUE, LABEL!=VALUE, "
        "'LABEL in (A,B)', 'LABEL notin (A,B)', LABEL, !LABEL (repeatable)",
    )  # fmt: skip
    deploy.add_argument("--spread", metavar="LABEL", help="spread replicas across this label")
    deploy.add_argument(
        "--label", action="append", default=[], metavar="NAME=VALUE",
        help="a label of the replicas (repeatable)",
    )  # fmt: skip
    deploy.add_argument(
        "-e", "--env", action="append", default=[], metavar="NAME=VALUE",
        help="an environment variable of the replicas (repeatable)",
    )  # fmt: skip
    deploy.add_argument("--arg", action="append", default=[], help="an argument (repeatable)")
    deploy.add_argument("--delete", action="store_true", help="remove the deployment")


# -- talking to a coordinator --------------------------------------------------------------


def coordinator_urls(flag: str | None) -> list[str]:
    text = flag or os.environ.get("NOVA_COORDINATOR") or DEFAULT_COORDINATOR
    urls = [u.strip().rstrip("/") for u in text.split(",") if u.strip()]
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise errors.UsageError(f"invalid --coordinator {url!r}: expected http://HOST:PORT")
    return urls


def call(urls: list[str], method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """(HTTP status, JSON) from the first coordinator that answers."""
    data = None if body is None else json.dumps(body).encode()
    failures = []
    for url in urls:
        request = urllib.request.Request(url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"null")
            except ValueError:
                return exc.code, {"error": f"HTTP {exc.code} {exc.reason}"}
        except (OSError, ValueError) as exc:
            failures.append(f"{url}: {getattr(exc, 'reason', exc)}")
    raise errors.NovaError(
        "no coordinator answered (" + "; ".join(failures) + "); is nova-coordinator running? "
        "(--coordinator / NOVA_COORDINATOR)"
    )


# -- nova status -----------------------------------------------------------------------------


def status_main(args: argparse.Namespace) -> int:
    code, body = call(coordinator_urls(args.coordinator), "GET", "/v1/status")
    if code != 200:
        raise errors.NovaError(_refusal(body, code))
    if args.json:
        print(json.dumps(body, indent=2, sort_keys=True))
        return 0
    print(format_status(body))
    return 0


def format_status(body: dict[str, Any]) -> str:
    leader = body.get("leader") or {}
    me = body.get("coordinator") or {}
    lines = []
    if leader.get("id"):
        lines.append(
            f"leader:       {leader['id']} ({leader.get('api') or '-'}), epoch {leader['epoch']}"
        )
    else:
        lines.append(
            f"leader:       none (last epoch {leader.get('epoch', 0)}): an election is due"
        )
    role = "leader" if me.get("acting") else "standby"
    lines.append(f"answered by:  {me.get('id', '?')} ({role})")
    nodes = body.get("nodes") or []
    healthy = sum(1 for n in nodes if n.get("healthy"))
    lines.append(f"nodes:        {len(nodes)} ({healthy} healthy, {len(nodes) - healthy} failed)")
    lines.append(
        f"deployments:  {body.get('deployments', 0)}, "
        f"{body.get('replicas_assigned', 0)} replicas assigned"
    )
    last = body.get("last_pass")
    if last:
        why = ", ".join(
            f"{n} {r}" for r, n in sorted((last.get("unplaced_by_reason") or {}).items())
        )
        lines.append(
            f"last pass:    {last['replicas']} replicas, {last['unplaced']} unplaced"
            + (f" ({why})" if why else "")
            + f", {last['moved']} moved, {last['written']} assignments written"
        )
    if nodes:
        lines.append("")
        rows = [("NODE", "HEALTH", "ADDRESS", "CPU", "MEMORY", "REPLICAS", "LABELS")]
        for n in sorted(nodes, key=lambda n: str(n.get("node"))):
            capacity = n.get("capacity") or {}
            labels = ",".join(f"{k}={v}" for k, v in sorted((n.get("labels") or {}).items()))
            rows.append(
                (
                    str(n.get("node")),
                    "healthy" if n.get("healthy") else "failed",
                    str(n.get("address") or "-"),
                    f"{capacity.get('cpu_millicores', 0)}m",
                    _size(capacity.get("memory_bytes", 0)),
                    str(n.get("assigned", 0)),
                    labels or "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, factor in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.4g}{unit}"
    return f"{n}B"


def _refusal(body: Any, code: int) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return f"the coordinator answered HTTP {code}"


# -- nova deploy -----------------------------------------------------------------------------


def deploy_main(args: argparse.Namespace) -> int:
    urls = coordinator_urls(args.coordinator)
    if args.delete:
        if not args.name or args.file:
            raise errors.UsageError("--delete takes the deployment NAME (and --namespace), no -f")
        namespace = args.namespace or "default"
        path = f"/v1/deployments/{urllib.parse.quote(namespace)}/{urllib.parse.quote(args.name)}"
        code, body = call(urls, "DELETE", path)
        if code != 200:
            raise errors.NovaError(_refusal(body, code))
        print(f"deleted {body['deleted']}")
        return 0
    spec = deployment_from_file(args.file) if args.file else {}
    spec = _apply_flags(spec, args)
    code, body = call(urls, "POST", "/v1/deployments", spec)
    if code not in (200, 201):
        if code == 400:
            raise errors.UsageError(_refusal(body, code))
        raise errors.NovaError(_refusal(body, code))
    d = body["deployment"]
    verb = "created" if code == 201 else ("updated" if body.get("changed") else "unchanged")
    print(
        f"{verb} {d['namespace']}/{d['name']}: {d['replicas']} x {d['image'] or d['digest']} "
        f"({d['digest'][:19]}…), generation {d['generation']}"
    )
    return 0


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise errors.UsageError(f"invalid {flag} {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


def _apply_flags(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The API body: the file's fields, overridden by flags, with defaults for the rest."""
    out = dict(spec)
    if args.name:
        out["name"] = args.name
    if args.namespace:
        out["namespace"] = args.namespace
    if args.image:
        out["image"] = args.image
        out.pop("digest", None)
    if args.replicas is not None:
        if args.replicas < 0:
            raise errors.UsageError(f"invalid --replicas {args.replicas}: must be >= 0")
        out["replicas"] = args.replicas
    if args.cpu:
        out["cpu_millicores"] = parse_millicores(args.cpu)
    if args.memory:
        out["memory_bytes"] = parse_size(args.memory, what="--memory")
    if args.constraint:
        out["constraints"] = list(args.constraint)
    if args.spread:
        out["spread"] = args.spread
    if args.label:
        out["labels"] = _pairs(args.label, "--label")
    if args.env:
        out["env"] = _pairs(args.env, "--env")
    if args.arg:
        out["args"] = list(args.arg)
    out.setdefault("namespace", "default")
    out.setdefault("replicas", 1)
    out.setdefault("cpu_millicores", 100)
    out.setdefault("memory_bytes", 64 << 20)
    if not out.get("name"):
        raise errors.UsageError("give the deployment's NAME (or metadata.name in -f FILE)")
    if not out.get("image") and not out.get("digest"):
        raise errors.UsageError("give --image NAME:TAG (or spec.image in -f FILE)")
    return out


def deployment_from_file(path: Path) -> dict[str, Any]:
    """A Deployment YAML file as the API body; UsageError naming the file and field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise errors.UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise errors.UsageError(f"{path}: not valid YAML: {exc}") from None
    return deployment_from_doc(doc, str(path))


def deployment_from_doc(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise errors.UsageError(f"{where}: expected a Deployment document (a mapping)")
    if doc.get("apiVersion") != "nova.sh/v1" or doc.get("kind") != "Deployment":
        raise errors.UsageError(f"{where}: expected apiVersion: nova.sh/v1 and kind: Deployment")
    meta, spec = doc.get("metadata") or {}, doc.get("spec") or {}
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        raise errors.UsageError(f"{where}: metadata and spec must be mappings")
    unknown = set(spec) - {"image", "replicas", "resources", "constraints", "spread", "args", "env"}
    if unknown:
        raise errors.UsageError(f"{where}: unknown field spec.{sorted(unknown)[0]}")
    out: dict[str, Any] = {}
    for field, value in (("name", meta.get("name")), ("namespace", meta.get("namespace"))):
        if value is not None:
            out[field] = str(value)
    if meta.get("labels") is not None:
        out["labels"] = _str_map(meta["labels"], f"{where}: metadata.labels")
    if spec.get("image") is not None:
        out["image"] = str(spec["image"])
    if spec.get("replicas") is not None:
        if not isinstance(spec["replicas"], int) or spec["replicas"] < 0:
            raise errors.UsageError(f"{where}: spec.replicas must be an integer >= 0")
        out["replicas"] = spec["replicas"]
    resources = spec.get("resources") or {}
    if not isinstance(resources, dict):
        raise errors.UsageError(f"{where}: spec.resources must be a mapping (cpu, memory)")
    if resources.get("cpu") is not None:
        out["cpu_millicores"] = parse_millicores(str(resources["cpu"]))
    if resources.get("memory") is not None:
        out["memory_bytes"] = parse_size(str(resources["memory"]), what="spec.resources.memory")
    if spec.get("env") is not None:
        out["env"] = _str_map(spec["env"], f"{where}: spec.env")
    constraints = spec.get("constraints")
    if isinstance(constraints, list):
        out["constraints"] = [str(c) for c in constraints]
    elif constraints is not None:
        out["constraints"] = _str_map(constraints, f"{where}: spec.constraints")
    if spec.get("spread") is not None:
        out["spread"] = str(spec["spread"])
    if spec.get("args") is not None:
        if not isinstance(spec["args"], list):
            raise errors.UsageError(f"{where}: spec.args must be a list")
        out["args"] = [str(a) for a in spec["args"]]
    return out


def _str_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise errors.UsageError(f"{where} must be a mapping of names to values")
    return {str(k): str(v) for k, v in value.items()}
