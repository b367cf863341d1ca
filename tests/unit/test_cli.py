"""`nova` daemonless: the real console script, no agent, real workers.

Each test runs `nova` as a user would (a subprocess with NOVA_STATE_DIR,
NOVA_CACHE_DIR and NOVA_SOCKET under tmp_path) and checks exactly what the
user sees: stdout, one clear stderr line, the documented exit code, and that
nothing keeps running afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import wasmtime

from nova import errors

pytestmark = pytest.mark.usefixtures("nova_dirs", "shared_module_cache", "no_leftover_processes")

BIN = Path(sys.executable).parent
CLI_TIMEOUT_S = 60.0


def console_script(name: str, module: str) -> list[str]:
    """The installed console script, or its module when the venv has none."""
    script = BIN / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


NOVA = console_script("nova", "nova.cli.main")


def nova(
    *args: str | Path, timeout: float = CLI_TIMEOUT_S, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `nova ARGS...` to completion with this test's environment."""
    return subprocess.run(
        [*NOVA, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def nova_many(*argvs: list[str | Path]) -> list[subprocess.CompletedProcess[str]]:
    """Run several independent `nova` commands at once (as several terminals would)."""
    procs = [
        subprocess.Popen(
            [*NOVA, *map(str, argv)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for argv in argvs
    ]
    try:
        outputs = [proc.communicate(timeout=CLI_TIMEOUT_S) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()  # a no-op unless one hung
            proc.wait()
    return [
        subprocess.CompletedProcess(argv, proc.returncode, out, err)
        for argv, proc, (out, err) in zip(argvs, procs, outputs, strict=True)
    ]


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line a failed command prints (no traceback, no noise)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return lines[0]


def test_run_prints_the_output_and_exits_0(examples: Path) -> None:
    result = nova(
        "run", examples / "hello.wasm", "--env", "NAME=nova", "--memory", "64Mi",
        "--timeout", "5s", "--", "arg1", "arg2",
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "hello from wasm, nova\narg[1]=arg1\narg[2]=arg2\n"


def test_args_after_double_dash_belong_to_the_guest(examples: Path) -> None:
    result = nova("run", examples / "hello.wasm", "--", "--memory", "-x")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from wasm, world\narg[1]=--memory\narg[2]=-x\n"


IMPORTS_MAGIC = """
(module (import "env" "nova_magic" (func $magic))
        (memory (export "memory") 1)
        (func (export "_start") call $magic))
"""
NO_START = '(module (memory (export "memory") 1))'


def write_wat(path: Path, wat: str) -> Path:
    path.write_bytes(bytes(wasmtime.wat2wasm(wat)))
    return path


@pytest.mark.parametrize(
    ("case", "exit_code", "says"),
    [
        ("missing file", errors.EXIT_NOT_FOUND, "no such file"),
        ("not wasm", errors.EXIT_CANNOT_RUN, "not a WebAssembly module"),
        ("unsupported import", errors.EXIT_CANNOT_RUN, "env.nova_magic, which Nova does not"),
        ("no _start", errors.EXIT_CANNOT_RUN, "exports no _start"),
        ("bad --memory", errors.EXIT_USAGE, "invalid --memory '12XB'"),
        ("bad --env", errors.EXIT_USAGE, "invalid --env 'NAME': expected NAME=VALUE"),
        ("bad --dir", errors.EXIT_USAGE, "is not a directory"),
        ("bad --name", errors.EXIT_USAGE, "invalid name 'a/b'"),
        ("unknown flag", errors.EXIT_USAGE, "unknown flag or argument: --bogus"),
        ("bad --cpu", errors.EXIT_USAGE, "invalid --cpu 'half': expected cores or millicores"),
        ("tiny --cpu", errors.EXIT_USAGE, "invalid --cpu '0.0001': must be at least 1m"),
        ("bad --pids", errors.EXIT_USAGE, "invalid --pids '0': expected a whole number"),
        ("bad --isolation", errors.EXIT_USAGE, "invalid choice: 'cgroup'"),
        ("--cpu without cgroup", errors.EXIT_USAGE, "--isolation none has none"),
    ],
)
def test_bad_input_gives_one_clear_line_and_the_documented_code(
    case: str, exit_code: int, says: str, examples: Path, tmp_path: Path
) -> None:
    hello = examples / "hello.wasm"
    text = tmp_path / "notes.txt"
    text.write_text("not wasm\n")
    argv: dict[str, list[str | Path]] = {
        "missing file": ["run", tmp_path / "nosuch.wasm"],
        "not wasm": ["run", text],
        "unsupported import": ["run", write_wat(tmp_path / "imports.wasm", IMPORTS_MAGIC)],
        "no _start": ["run", write_wat(tmp_path / "lib.wasm", NO_START)],
        "bad --memory": ["run", hello, "--memory", "12XB"],
        "bad --env": ["run", hello, "--env", "NAME"],
        "bad --dir": ["run", hello, "--dir", f"{tmp_path / 'nodir'}:/data"],
        "bad --name": ["run", "--name", "a/b", hello],
        "unknown flag": ["run", "--bogus", hello],
        "bad --cpu": ["run", hello, "--cpu", "half"],
        "tiny --cpu": ["run", hello, "--cpu", "0.0001"],
        "bad --pids": ["run", hello, "--pids", "0"],
        "bad --isolation": ["run", hello, "--isolation", "cgroup"],
        "--cpu without cgroup": ["run", "--isolation", "none", "--pids", "4", hello],
    }  # fmt: skip
    result = nova(*argv[case])
    assert result.returncode == exit_code, result.stderr
    assert says in one_error_line(result)
    assert result.stdout == ""


def test_trap_exits_134_and_names_the_trap(examples: Path) -> None:
    result = nova("run", examples / "trap.wasm")
    assert result.returncode == errors.EXIT_TRAP
    assert result.stdout == "trap: about to abort\n"
    assert "trapped: wasm trap: wasm `unreachable` instruction executed" in one_error_line(result)


def test_exit_code_passes_through(examples: Path) -> None:
    result = nova("run", examples / "exit.wasm", "7")
    assert (result.returncode, result.stdout, result.stderr) == (7, "", "")


@pytest.mark.parametrize("app", [["cpu-spin.wasm"], ["sleep.wasm", "30"]], ids=["spin", "sleep"])
def test_timeout_stops_the_container_with_124(app: list[str], examples: Path) -> None:
    """A guest spinning in wasm (epoch) or blocked in a host call (watchdog) alike."""
    started = time.monotonic()
    result = nova("run", "--timeout", "300ms", examples / app[0], *app[1:])
    elapsed = time.monotonic() - started
    assert result.returncode == errors.EXIT_TIMEOUT, result.stderr
    assert "timeout: ran past its timeout of 0.3s" in one_error_line(result)
    assert elapsed < 10, f"took {elapsed:.1f}s to stop a 300ms timeout"


def test_memory_limit_is_reported(examples: Path) -> None:
    result = nova("run", "--memory", "16Mi", examples / "mem-grow.wasm")
    assert result.returncode == 3
    lines = result.stderr.splitlines()
    assert lines[0].startswith("mem-grow: allocation failed after")  # the guest's own line
    assert lines[-1].endswith("exited with code 3 (the container reached its memory limit)")
    assert len(lines) == 2


def test_dir_is_preopened_read_only(examples: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("from the host\n")
    mount = f"{data}:/data:ro"
    read = nova("run", "--dir", mount, examples / "cat.wasm", "--", "/data/notes.txt")
    assert (read.returncode, read.stdout, read.stderr) == (0, "from the host\n", "")

    write = nova("run", "--dir", mount, examples / "cat.wasm", "--", "--write", "/data/x", "hi")
    assert write.returncode == 1
    assert write.stderr.startswith("cat: /data/x: ")
    assert not (data / "x").exists()


@pytest.mark.parametrize(
    "argv",
    [["run", "--detach", "hello.wasm"], ["ps"], ["stop", "web"]],
    ids=["run-detach", "ps", "stop"],
)
def test_agent_commands_without_an_agent_fail_with_125(
    argv: list[str], examples: Path, nova_dirs: Path
) -> None:
    result = nova(*(examples / a if a.endswith(".wasm") else a for a in argv))
    assert result.returncode == errors.EXIT_NOVA
    line = one_error_line(result)
    assert str(nova_dirs / "agent.sock") in line
    assert "nova-agent --standalone" in line  # what to do about it


def test_help_documents_exit_codes_and_examples() -> None:
    top = nova("--help")
    assert top.returncode == 0
    for text in ("exit status", "124 timeout", "126", "127", "134 trap", "examples:", "nova run"):
        assert text in top.stdout, text

    run = nova("run", "--help")
    assert run.returncode == 0
    for text in ("exit status", "124 timeout", "127 not found", "134 trap", "examples:"):
        assert text in run.stdout, text
    assert "nova run app.wasm --env NAME=nova --memory 64Mi --timeout 5s -- arg1 arg2" in run.stdout


def test_no_command_prints_usage_and_exits_2() -> None:
    result = nova()
    assert result.returncode == errors.EXIT_USAGE
    assert "usage: nova" in result.stderr


def test_socket_flag_overrides_the_environment(examples: Path, tmp_path: Path) -> None:
    env = dict(os.environ, NOVA_SOCKET=str(tmp_path / "elsewhere.sock"))
    result = nova("--socket", tmp_path / "given.sock", "ps", env=env)
    assert result.returncode == errors.EXIT_NOVA
    assert str(tmp_path / "given.sock") in one_error_line(result)
