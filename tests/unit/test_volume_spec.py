"""How runs name volumes: `--volume` syntax, the spec's JSON, `nova volume` parsing (pure)."""

from __future__ import annotations

import pytest

from agent.sandbox.spec import DirMount, RunSpec, VolumeMount
from agent.volumes_api import parse_run_fields
from nova import errors
from nova.cli.main import parse


def test_volume_mounts_parse_like_dirs_but_need_a_guest_path() -> None:
    assert VolumeMount.parse("data:/data") == VolumeMount("data", "/data")
    assert VolumeMount.parse("team/data:/d:ro") == VolumeMount("team/data", "/d", read_only=True)
    for bad in ("data", "data:", ":/data", "a:b:c:d"):
        with pytest.raises(errors.UsageError, match="invalid --volume"):
            VolumeMount.parse(bad)


def test_a_spec_carries_namespace_and_volumes_and_preopens_them_after_dirs() -> None:
    spec = RunSpec(
        id="c1", name="n", digest="d", artifact="a", namespace="nvta",
        dirs=(DirMount("/srv", "/srv", read_only=True),),
        volumes=(VolumeMount("data", "/data", host="/v/mnt/nvta/data/data"),),
    )  # fmt: skip
    again = RunSpec.from_json(spec.to_json())
    assert again == spec
    assert again.preopens() == [("/srv", "/srv", True), ("/v/mnt/nvta/data/data", "/data", False)]
    old = {k: v for k, v in spec.to_json().items() if k not in ("namespace", "volumes")}
    assert RunSpec.from_json(old).namespace == "default"  # records from before volumes


def test_an_unresolved_volume_fails_the_run_not_the_worker() -> None:
    spec = RunSpec(id="c1", name="n", digest="d", artifact="a", volumes=(VolumeMount("x", "/x"),))
    with pytest.raises(OSError, match="volume 'x' was not resolved"):
        spec.preopens()


def test_run_fields_are_checked() -> None:
    assert parse_run_fields({}) == ("default", ())
    assert parse_run_fields({"namespace": "nvta", "volumes": ["d:/d"]}) == (
        "nvta",
        (VolumeMount("d", "/d"),),
    )
    with pytest.raises(errors.UsageError, match="invalid namespace 'Team A'"):
        parse_run_fields({"namespace": "Team A"})
    with pytest.raises(errors.UsageError, match="field 'volumes'"):
        parse_run_fields({"volumes": "d:/d"})


def test_nova_volume_commands_parse() -> None:
    args = parse(["volume", "create", "data", "--size", "64Mi", "--namespace", "nvta"])
    assert (args.command, args.action, args.name, args.size, args.namespace) == (
        "volume", "create", "data", "64Mi", "nvta"
    )  # fmt: skip
    args = parse(["volume", "ls", "--json"])
    assert (args.action, args.namespace, args.json) == ("ls", None, True)
    args = parse(["run", "--volume", "data:/data", "--namespace", "nvta", "app.wasm", "--", "x"])
    assert (args.volume, args.namespace, args.args) == (["data:/data"], "nvta", ["x"])
    with pytest.raises(SystemExit) as usage:
        parse(["volume", "create", "data"])
    assert usage.value.code == errors.EXIT_USAGE
