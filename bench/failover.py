"""Leader failover: fault -> the new leader's first fenced write, beside `consul lock`.

A lab of 5 hosts (network namespaces, tests/cluster/lab.py): Consul servers
on h0-h2 (raft_multiplier 1, session_ttl_min 1s, default gossip), Consul
clients on h3 and h4, where the contenders run. Needs root and `consul`.

Nova: nova-coordinator on h3 and h4 with their default lease timing
(session TTL 1 s, check TTL 1.5 s, heartbeat 0.3 s). Each trial faults the
leader and measures from the wall clock just before the fault to the `at`
of the term record the new leader writes through the fence (its first
fenced write). Then the faulted one comes back and stands by again.
  sigkill  SIGKILL the leader's process
  cut      cut the leader's host off (nftables drops all but loopback in its
           netns; --cut link takes its interface down instead)
For cuts, the old leader's "stopped acting" log time is compared with the
new leader's first write: `min_gap_s` > 0 means they never overlapped.

Peer: `consul lock PREFIX CHILD` (the standard Consul tool, its defaults:
15 s session TTL, 15 s lock delay) on the same cluster in the same run: a
holder on h3, a waiter on h4; measured from killing the holder's `consul
lock` (sigkill) / cutting h3 off (cut) until the waiter's child runs (it
writes the time first). Its trials run --lock-batch at a time, each on its
own lock (one at a time would take ~45 s each); a cut batch shares one cut.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from bench import common
from tests.cluster.lab import Host, Lab, LabError, LabProcess, coordinator_id
from tests.cluster.lab_nova import Cluster, LabTimeout, log_time, wait_for

T = TypeVar("T")
TERM = "nova/v1/coordinator/term"
GOAL_P50_S = 2.5
GOAL_MAX_S = 5.0
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
NS_PER_S = 1e9
STUCK = "standbys restarted"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=20, help="trials per fault (default 20)")
    parser.add_argument(
        "--lock-batch", type=int, default=10, help="`consul lock` trials run at once (default 10)"
    )
    parser.add_argument("--cut", choices=["nft", "link"], default="nft", help="how to cut a host")
    parser.add_argument(
        "--colocated-trials",
        type=int,
        default=10,
        help="trials of cutting off a host that runs the Nova leader and the Consul raft "
        "leader (contenders on h1, h2; default 10, 0 skips)",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip `consul lock`")


class NovaContenders:
    """nova-coordinator on two hosts; the trials fault whichever leads."""

    def __init__(self, lab: Lab, hosts: list[Host]) -> None:
        self.lab = lab
        self.hosts = hosts
        self.cluster = Cluster(lab, {}, {})  # coordinators only: no agents, no deployments
        for host in hosts:
            self.cluster.start_coordinator(host)
        self.processes = self.cluster.coordinators
        self.term = self.cluster.term
        self.stuck: list[dict[str, Any]] = []  # standbys restarted to go on (see ready())

    def leader(self) -> tuple[Host, dict[str, Any]]:
        ids = {coordinator_id(h): h for h in self.hosts}

        def ours() -> dict[str, Any] | None:
            term = self.term()
            return term if term and term["id"] in ids else None

        term = wait_for("one of ours leading", ours, 30.0)
        return ids[term["id"]], term

    def standing_by(self, host: Host) -> bool:
        me = self.cluster.status_of(host)["coordinator"]
        return bool(me["session"]) and not me["acting"] and me["lease_remaining_s"] > 0.3

    def ready(self) -> tuple[Host, dict[str, Any]]:
        """One leads, the other holds a live session: a trial may start."""
        leader, term = self.leader()
        for host in self.hosts:
            if host is not leader:
                what = f"{coordinator_id(host)} standing by"
                try:
                    wait_for(what, partial(self.standing_by, host), 30.0)
                except LabTimeout:
                    # Not what is measured, but counted and reported: a coordinator that
                    # did not come back to standby within 30 s of its host's return.
                    process = self.processes[host.name]
                    self.stuck.append(
                        {"coordinator": coordinator_id(host), "log": process.log_tail(8)}
                    )
                    process.stop()
                    self.cluster.start_coordinator(host)
                    wait_for(what, partial(self.standing_by, host), 30.0)
        time.sleep(0.5)  # a few heartbeats into the steady state
        return leader, term

    def trial(self, fault: str, cut_how: str) -> dict[str, Any]:
        leader, term = self.ready()
        if fault == "cut-raft-leader":  # the raft leader goes down with the Nova leader
            self.lab.move_raft_leader(leader)
            leader, term = self.ready()
        fault_at = time.time()
        if fault == "sigkill":
            self.processes[leader.name].kill()
        else:
            self.lab.cut(leader, cut_how)
        new = wait_for(
            "a new Nova leader",
            lambda: (t := self.term()) and t["epoch"] > term["epoch"] and t,
            30.0,
        )
        took = new["at"] - fault_at
        sample: dict[str, Any] = {"s": round(took, 4), "from": leader.name, "epoch": new["epoch"]}
        if fault == "sigkill":
            self.cluster.start_coordinator(leader)
        else:
            stopped = wait_for(
                "the old leader stopping",
                lambda: log_time(
                    self.processes[leader.name],
                    re.escape(f"stopped acting as leader (epoch {term['epoch']})"),
                ),
                10.0,
            )
            sample["gap_s"] = round(new["at"] - stopped, 4)  # > 0: no two leaders acting
            self.lab.heal(leader)
            self.lab.wait_consul()
        return sample


class ConsulLock:
    """`consul lock` holders on one host and waiters on another, one lock per trial."""

    def __init__(self, lab: Lab, holder: Host, waiter: Host) -> None:
        self.lab = lab
        self.holder_host = holder
        self.waiter_host = waiter
        self.dir = lab.workdir / "consul-lock"
        self.dir.mkdir(exist_ok=True)
        self.count = 0

    def _start(self, host: Host, prefix: str, mark: Path) -> LabProcess:
        # The child records when it runs, then holds the lock (exec: its pid is in mark.pid).
        child = (
            f"date +%s.%N > {mark}.tmp && mv {mark}.tmp {mark}; "
            f"echo $$ > {mark}.pid; exec sleep 3600"
        )
        argv = [self.lab.consul_binary, "lock", f"-http-addr={host.local_consul}", prefix, child]
        return self.lab.spawn(host, f"consul-lock-{self.count}-{host.name}", argv)

    def _hold(self, prefix: str, held: Path) -> LabProcess:
        """A holder of `prefix`; started again if `consul lock` gives up (a host just healed
        may answer "no known Consul servers" for a moment)."""
        for _ in range(5):
            holder = self._start(self.holder_host, prefix, held)
            deadline = time.monotonic() + 20.0
            while time.monotonic() < deadline and holder.alive() and not held.exists():
                time.sleep(0.05)
            if held.exists():
                return holder
            holder.kill()
            time.sleep(1.0)
        raise common.BenchError(f"consul lock {prefix} never held:\n{holder.log_tail()}")

    def batch(self, fault: str, size: int, cut_how: str) -> list[dict[str, Any]]:
        trials = []
        for _ in range(size):
            self.count += 1
            prefix = f"bench/consul-lock/{self.lab.token}/{self.count}"
            held, won = self.dir / f"{self.count}.held", self.dir / f"{self.count}.won"
            holder = self._hold(prefix, held)
            trials.append((holder, self._start(self.waiter_host, prefix, won), held, won))
        time.sleep(1.0)  # every waiter is in its blocking query
        faults: list[float] = []
        if fault == "sigkill":
            for holder, *_ in trials:
                faults.append(time.time())
                holder.kill()
        else:
            faults = [time.time()] * len(trials)
            self.lab.cut(self.holder_host, cut_how)
        samples = []
        try:
            for (_, _, _, won), fault_at in zip(trials, faults, strict=True):
                wait_for(f"{won} written", won.exists, 180.0, every=0.1)
                samples.append({"s": round(float(won.read_text()) - fault_at, 4)})
        finally:
            if fault == "cut":
                self.lab.heal(self.holder_host)
            for holder, waiter, held, won in trials:
                for process in (holder, waiter):
                    process.kill()
                for mark in (held, won):
                    kill_pidfile(Path(f"{mark}.pid"))
            self.lab.wait_consul()
        return samples


def kill_pidfile(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(path.read_text()), signal.SIGKILL)


def summarize_s(samples: list[dict[str, Any]]) -> common.Summary:
    return common.summarize([s["s"] * NS_PER_S for s in samples])


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.trials < 1 or args.lock_batch < 1:
        raise common.BenchError("--trials and --lock-batch must be at least 1")
    try:
        lab = Lab.create(5)
    except LabError as exc:  # not root, no consul binary: say so, no traceback
        raise common.BenchError(str(exc)) from None
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        measure(lab, args, results)
    except LabTimeout as exc:
        raise common.BenchError(str(exc)) from None
    finally:
        lab.down()
    return report(args, results)


def measure(lab: Lab, args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> None:
    lab.up()
    contenders = NovaContenders(lab, lab.hosts[3:5])
    for fault in ("sigkill", "cut"):
        name = f"nova {fault}"
        results[name] = []
        for i in range(args.trials):
            sample = contenders.trial(fault, args.cut)
            results[name].append(sample)
            print(f"{name} {i + 1}/{args.trials}: {sample['s']:.3f} s", flush=True)
    for process in contenders.processes.values():
        process.stop()
    results[STUCK] = contenders.stuck
    if args.colocated_trials > 0:
        # Coordinators on two Consul server hosts; before each cut the raft leader is
        # moved to the Nova leader's host: raft elects, then sessions' TTLs restart.
        colocated = NovaContenders(lab, lab.hosts[1:3])
        name = "nova cut-raft-leader"
        results[name] = []
        for i in range(args.colocated_trials):
            sample = colocated.trial("cut-raft-leader", args.cut)
            results[name].append(sample)
            print(f"{name} {i + 1}/{args.colocated_trials}: {sample['s']:.3f} s", flush=True)
        for process in colocated.processes.values():
            process.stop()
        results[STUCK] += colocated.stuck
    if not args.no_peer:
        lock = ConsulLock(lab, lab.hosts[3], lab.hosts[4])
        for fault in ("sigkill", "cut"):
            name = f"consul lock {fault}"
            results[name] = []
            for size in common.split_evenly(args.trials, -(-args.trials // args.lock_batch)):
                batch = lock.batch(fault, size, args.cut)
                results[name] += batch
                print(f"{name}: {[round(s['s'], 1) for s in batch]} s", flush=True)


def report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    stuck = results.pop(STUCK, [])
    summaries = {name: summarize_s(samples) for name, samples in results.items()}
    rows = [
        [name, s.n, s.p50_us / 1e6, s.p99_us / 1e6, s.max_us / 1e6, s.min_us / 1e6]
        for name, s in summaries.items()
    ]
    print(common.format_table(("variant", "n", "p50 s", "p99 s", "max s", "min s"), rows))
    gaps = [
        s["gap_s"]
        for name in ("nova cut", "nova cut-raft-leader")
        for s in results.get(name, [])
        if "gap_s" in s
    ]
    goals = {
        f"nova {fault}": {
            "p50_le_2_5_s": summaries[f"nova {fault}"].p50_us / 1e6 <= GOAL_P50_S,
            "max_lt_5_s": summaries[f"nova {fault}"].max_us / 1e6 < GOAL_MAX_S,
        }
        for fault in ("sigkill", "cut")
    }
    return {
        "unit": "summaries in µs; samples in s",
        "topology": "Consul servers h0-h2; contenders on Consul clients h3, h4; "
        + f"cut: {args.cut}",
        "variants": summaries,
        "samples": results,
        "ratios": common.ratios(
            summaries,
            [("nova sigkill", "consul lock sigkill"), ("nova cut", "consul lock cut")],
        ),
        "goals": goals,
        "standbys_restarted": stuck,  # not back to standby 30 s after a heal (see ready())
        "old_leader_stopped_before_new_first_write": {
            "min_gap_s": min(gaps) if gaps else None,
            "all": all(g > 0 for g in gaps) if gaps else None,
        },
    }
