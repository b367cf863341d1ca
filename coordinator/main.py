"""nova-coordinator: global placement and controllers for a Nova cluster.

Cluster mode (Consul, leader election, placement) is not part of this
release; the command exists so packaging and unit files are stable.
"""

from __future__ import annotations

import argparse
import sys

from nova import errors


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="nova-coordinator",
        description=(
            "Elect one leader among coordinators through a Consul session lock and "
            "place containers on nodes. Not available in this release: a single host "
            "runs `nova-agent --standalone`, which needs no coordinator."
        ),
    )


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print(
        "nova-coordinator: cluster mode is not available in this release; "
        "run `nova-agent --standalone` on a single host",
        file=sys.stderr,
    )
    return errors.EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
