"""`nova-agent` cluster flags and `--image` without a cluster: clear errors, nothing started."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nova import errors
from tests.unit.test_agent import NOVA_AGENT, AgentProcess
from tests.unit.test_cli import nova, one_error_line


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--consul", "ftp://x"], "invalid --consul"),
        (["--consul", "http://127.0.0.1:8500", "--node", "a/b"], "invalid --node"),
        (["--consul", "http://127.0.0.1:8500", "--labels", "zone"], "expected NAME=VALUE"),
        (["--consul", "http://127.0.0.1:8500", "--advertise", "host"], "invalid --advertise"),
        (["--standalone", "--labels", "zone=a"], "--labels and --advertise need --consul"),
    ],
)
def test_bad_cluster_flags_are_usage_errors(flags: list[str], message: str) -> None:
    result = subprocess.run(
        [*NOVA_AGENT, *flags], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == errors.EXIT_USAGE
    assert message in one_error_line(result)


@pytest.mark.usefixtures("shared_module_cache", "no_leftover_processes")
def test_run_image_needs_a_cluster_agent(nova_dirs: Path) -> None:
    without_agent = nova("run", "--image", "web:1")
    assert without_agent.returncode == errors.EXIT_NOVA
    assert "--image needs an agent started with --consul" in one_error_line(without_agent)
    agent = AgentProcess(nova_dirs).wait_ready()
    try:
        standalone = nova("run", "--image", "web:1")
        assert standalone.returncode == errors.EXIT_USAGE
        assert "this agent runs --standalone" in one_error_line(standalone)
        bad_ref = nova("run", "--image", "sha256:12")
        assert bad_ref.returncode == errors.EXIT_USAGE
        assert "invalid --image 'sha256:12'" in one_error_line(bad_ref)
        assert agent.proc.poll() is None
    finally:
        agent.end()
