"""nova: run and inspect WebAssembly containers.

`nova run` goes through the local agent when one answers on its socket, and
otherwise runs the container itself (daemonless, on the embedded default).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from nova import errors
from nova.cli import cluster, volume
from nova.cli import policy as policy_cli

TOP_DESCRIPTION = """\
Nova runs WebAssembly (WASI) programs as containers: each in its own sandboxed
worker process, started from a warm pool in microseconds.
"""

TOP_EPILOG = """\
commands:
  run      run a module (through the local agent, or daemonless without one)
  ps       list containers
  logs     print a container's output
  stop     stop a running container
  rm       forget an exited container and delete its logs
  image    push, list and inspect images in the cluster (Consul)
  doctor   report what this host supports (cgroups, BPF, VXLAN, nftables, ...)
  volume   create, list and remove encrypted volumes (nova volume --help)
  policy   show and test network policy (status, test)
  status   the cluster: leading coordinator, epoch, nodes and their health
  deploy   create, update or delete a deployment in the cluster

Run `nova COMMAND --help` for a command's options.

examples:
  nova run hello.wasm --env NAME=nova -- arg1 arg2
  nova run --detach --name spin cpu-spin.wasm
  nova ps -a
  nova logs -f spin
  nova stop spin && nova rm spin

exit status (nova run): the container's own exit code when it exits; 2 usage
error; 124 timeout; 125 Nova failed; 126 module cannot run (not wasm, invalid,
imports Nova lacks); 127 module not found; 134 trap; 137 killed (or OOMKilled);
143 stopped.
"""

RUN_DESCRIPTION = """\
Run MODULE, a WebAssembly command module (WASI preview1), with ARGS.

If a nova-agent answers on its socket, the container runs under the agent:
its output is streamed here, and with --detach it keeps running in the
background (see `nova ps`, `nova logs`, `nova stop`). Without an agent the
container runs daemonless in this process's sandbox.

As root, every container gets a cgroup of its own (--isolation auto): its
memory (--memory plus 64Mi for the worker process), --cpu and --pids limits
hold for the whole worker, and the kernel's OOM killer ends it (OOMKilled,
exit 137) if it goes past them. Other users run without cgroups; --cpu and
--pids then print a notice and are not enforced.

As root (agent or daemonless), every container also gets a network namespace
of its own on its --namespace's segment, with an address of the node's CIDR
(`nova ps --json` shows it): containers of one namespace reach each other,
containers of different namespaces cannot exchange a single packet. A --port
is published on the host as well. --isolation none (unsafe) runs the plain
sandbox, sharing the host's network. A daemonless run as root gets its own
netns too.
"""

RUN_EPILOG = """\
examples:
  nova run app.wasm
  nova run app.wasm --env NAME=nova --memory 64Mi --timeout 5s -- arg1 arg2
  nova run cat.wasm --dir ./data:/data:ro -- /data/notes.txt
  nova run --detach --name web --port 8080 handler.wasm
  nova run --cpu 500m --pids 16 --memory 64Mi cpu-spin.wasm -- 5
  nova run --image web:1.0 -- arg1        (an agent with --consul fetches it)
  nova run --namespace team-a --volume data:/data cat.wasm -- /data/notes.txt

sizes: 64Mi, 1Gi, 500M, 1048576 (bytes). durations: 250ms, 5s, 2m.
cpu: 500m (half a core), 0.25, 2 (cores).

HTTP (--port): each request runs a fresh instance of MODULE with the WAGI
interface (CGI/1.1 over WASI stdio): request metadata in environment variables,
the body on stdin, and the response (CGI headers, blank line, body) on stdout.

exit status: the container's own exit code; 124 timeout; 125 Nova failed;
126 not runnable (not wasm, invalid, unsupported imports); 127 not found;
134 trap; 137 killed (or OOMKilled: past its cgroup's memory); 143 stopped;
2 usage error.
"""


class NovaArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        message = message.replace("unrecognized arguments", "unknown flag or argument")
        self.exit(errors.EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> NovaArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = NovaArgumentParser(
        prog="nova", description=TOP_DESCRIPTION, epilog=TOP_EPILOG, formatter_class=raw
    )
    parser.add_argument(
        "--socket", help="agent API socket (default: $NOVA_SOCKET or /run/nova/agent.sock)"
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=NovaArgumentParser
    )

    run = commands.add_parser(
        "run",
        help="run a module",
        description=RUN_DESCRIPTION,
        epilog=RUN_EPILOG,
        formatter_class=raw,
    )
    run.add_argument("module", metavar="MODULE", nargs="?", help="path of a .wasm file")
    run.add_argument(
        "--image",
        metavar="NAME:TAG",
        help="run an image from the cluster instead of MODULE (NAME:TAG or sha256:…; "
        "needs an agent started with --consul)",
    )
    run.add_argument("args", metavar="ARGS", nargs="*", help="arguments for the module (after --)")
    run.add_argument(
        "--name",
        help="container name: letters, digits, '.', '_', '-' (default: module name + suffix)",
    )
    run.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set an environment variable (repeatable)",
    )
    run.add_argument(
        "--dir", action="append", default=[], metavar="HOST[:GUEST][:ro]",
        help="preopen a host directory for the guest, read-only with :ro (repeatable)",
    )  # fmt: skip
    run.add_argument(
        "--volume", action="append", default=[], metavar="NAME:GUEST[:ro]",
        help="mount an encrypted volume of the container's namespace (see `nova volume`; "
        "needs the agent) (repeatable)",
    )  # fmt: skip
    run.add_argument(
        "--namespace", default="default", metavar="NS",
        help="the Nova namespace (tenant) to run in: with the agent as root, the container "
        "gets its own netns on that namespace's network segment (default: default)",
    )  # fmt: skip
    run.add_argument(
        "-l", "--label", action="append", default=[], metavar="KEY=VALUE",
        help="label the container (network policies select containers by label) (repeatable)",
    )  # fmt: skip
    run.add_argument("--memory", metavar="SIZE", help="cap the module's linear memory, e.g. 64Mi")
    run.add_argument(
        "--timeout", metavar="DURATION", help="stop the container after this long, e.g. 5s"
    )
    run.add_argument(
        "--cpu", metavar="CPU", help="CPU quota, e.g. 500m = half a core (needs a cgroup: root)"
    )
    run.add_argument(
        "--pids",
        metavar="N",
        help="cap the worker's processes and threads (needs a cgroup: root; default 64)",
    )
    run.add_argument(
        "--isolation",
        choices=["auto", "none"],
        default="auto",
        help="auto: a cgroup of its own when root (default); "
        "none: no cgroup, only the wasm limits hold (unsafe on a shared host)",
    )
    run.add_argument(
        "-d", "--detach", action="store_true", help="start under the agent and return its name"
    )
    run.add_argument(
        "-p", "--port", type=int, metavar="PORT", help="serve HTTP on PORT (WAGI handler)"
    )
    run.add_argument(
        "--host", default="127.0.0.1", help="address to serve HTTP on (default: 127.0.0.1)"
    )
    run.add_argument(
        "--no-agent",
        action="store_true",
        help="run daemonless in this process even if an agent runs",
    )

    ps = commands.add_parser("ps", help="list containers", description="List containers.")
    ps.add_argument("-a", "--all", action="store_true", help="include exited containers")
    ps.add_argument("--json", action="store_true", help="print JSON")

    logs = commands.add_parser(
        "logs",
        help="print a container's output",
        description="Print a container's stdout and stderr.",
    )
    logs.add_argument("name", metavar="NAME", help="container name or id")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing until the container exits"
    )

    stop = commands.add_parser(
        "stop",
        help="stop a container",
        description="Stop a running container (SIGTERM, then SIGKILL after the grace period).",
    )
    stop.add_argument("name", metavar="NAME", help="container name or id")
    stop.add_argument(
        "--grace", default="2s", metavar="DURATION", help="time before SIGKILL (default 2s)"
    )

    rm = commands.add_parser(
        "rm",
        help="forget an exited container",
        description="Forget an exited container and delete its logs.",
    )
    rm.add_argument("name", metavar="NAME", help="container name or id")

    doctor = commands.add_parser(
        "doctor",
        help="what this host supports",
        description="Report the kernel features and tools Nova uses on this host.",
    )
    doctor.add_argument("--json", action="store_true", help="print JSON")

    from nova.cli import image

    image.add_parser(commands)
    volume.add_parser(commands)
    policy_cli.add_parser(commands)
    cluster.add_parsers(commands)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse `nova [--socket PATH] COMMAND ...`.

    A command's own options may come before or after its positionals
    (`nova run app.wasm --memory 64Mi`); for `run`, everything after the
    first `--` belongs to the guest.
    """
    parser = build_parser()
    subparsers = _subparsers(parser)
    socket_path: str | None = None
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        flag = argv[i]
        if flag in ("-h", "--help"):
            parser.print_help()
            parser.exit(0)
        if flag == "--socket" and i + 1 < len(argv):
            socket_path, i = argv[i + 1], i + 2
        elif flag.startswith("--socket="):
            socket_path, i = flag.split("=", 1)[1], i + 1
        else:
            parser.error(f"unknown flag {flag}")
    if i == len(argv):
        parser.print_help(sys.stderr)
        parser.exit(errors.EXIT_USAGE)
    command, rest = argv[i], argv[i + 1 :]
    if command not in subparsers:
        parser.error(f"unknown command {command!r}")
    guest: list[str] = []
    if command == "run" and "--" in rest:
        cut = rest.index("--")
        rest, guest = rest[:cut], rest[cut + 1 :]
    command_parser = subparsers[command]
    if _subparsers(command_parser):  # intermixed parsing cannot nest subcommands
        args = command_parser.parse_args(rest)
    else:
        args = command_parser.parse_intermixed_args(rest)
    args.command = command
    args.socket = socket_path
    if command == "run":
        args.args = list(args.args) + guest
    return args


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "doctor":
            from nova import doctor

            return doctor.main(["--json"] if args.json else [])
        if args.command == "image":
            from nova.cli import image

            return image.main(args)
        if args.command == "volume":
            return volume.main(args)
        if args.command == "policy":
            return policy_cli.dispatch(args)
        if args.command == "status":
            return cluster.status_main(args)
        if args.command == "deploy":
            return cluster.deploy_main(args)
        from nova.cli import commands

        return commands.dispatch(args)
    except errors.NovaError as exc:
        print(f"nova {args.command}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
