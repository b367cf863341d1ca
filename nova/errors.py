"""Errors users see, each with the exit code the CLI returns for it.

Exit codes (documented in docs/cli.md):
  0-255  a container's own exit code passes through when it exits normally
  2      usage error: unknown flag, malformed value (argparse's convention)
  124    the container ran past --timeout and was stopped
  125    Nova itself failed (agent unreachable, internal error, store error)
  126    the module cannot run: not WebAssembly, invalid, or imports Nova lacks
  127    the module file (or image) was not found
  134    the container trapped (as wasmtime's own CLI reports a trap)
  137    the container was killed (SIGKILL, out of memory)
  143    the container was stopped (nova stop)
"""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_NOVA = 125
EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127
EXIT_TRAP = 134
EXIT_KILLED = 137
EXIT_STOPPED = 143


class NovaError(Exception):
    """An error with a one-line message for users and a CLI exit code."""

    exit_code = EXIT_NOVA

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(NovaError):
    """A flag or value the user typed is malformed."""

    exit_code = EXIT_USAGE


class ModuleNotFound(NovaError):
    """The module file or image does not exist."""

    exit_code = EXIT_NOT_FOUND


class InvalidModule(NovaError):
    """The file is not a valid WebAssembly module."""

    exit_code = EXIT_CANNOT_RUN


class UnsupportedImports(NovaError):
    """The module imports functions Nova does not provide."""

    exit_code = EXIT_CANNOT_RUN


class SandboxError(NovaError):
    """A worker process could not be started or talked to."""

    exit_code = EXIT_NOVA


class AgentUnavailable(NovaError):
    """No agent answers on the API socket."""

    exit_code = EXIT_NOVA
