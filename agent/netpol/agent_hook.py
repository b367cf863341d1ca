"""The agent's containers as policy endpoints: a ContainerManager network listener.

`manager.add_network_listener(PolicyListener(engine))` after recovery: the
manager then reports every running container with a netns of its own, and
each one as it starts and ends. A container a policy selects is enforced
before its workload runs (`container_starting`, awaited by the manager
between claiming the sandbox and launching the workload); others are
reported without waiting, so warm starts stay fast.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from agent.netpol.engine import PolicyEngine
from agent.netpol.tables import Endpoint
from agent.records import ContainerRecord

START_TIMEOUT_S = 5.0


def endpoint(record: ContainerRecord) -> Endpoint:
    """The endpoint of a container that has a network (`record.network` is set)."""
    assert record.network is not None, f"container {record.id} has no network"
    return Endpoint(
        key=record.id,
        ip=IPv4Address(record.network["ip"]),
        namespace=record.spec.namespace,
        labels=dict(record.spec.labels),
        host_ifname=record.network["host_ifname"],
    )


class PolicyListener:
    """Keeps the engine's endpoints in step with the agent's containers."""

    def __init__(self, engine: PolicyEngine, *, start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.engine = engine
        self.start_timeout_s = start_timeout_s

    async def container_starting(self, record: ContainerRecord) -> None:
        await self.engine.endpoint_starting(
            endpoint(record), name=record.name, timeout=self.start_timeout_s
        )

    def container_up(self, record: ContainerRecord) -> None:
        self.engine.add_endpoint(endpoint(record), name=record.name)

    def container_down(self, record: ContainerRecord) -> None:
        self.engine.remove_endpoint(record.id)
