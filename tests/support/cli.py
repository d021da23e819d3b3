"""Running the command line as a user does: in its own process (the installed entry point,
or ``python -m mergesearch.cli``), or in-process with typer's runner; and checking that a
refused command says one thing, in one line, without a traceback."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from typer.testing import CliRunner

from mergesearch.cli import app

from .recipes import write

MERGESEARCH = str(Path(sys.executable).parent / "mergesearch")  # the installed entry point
MERGESEARCH_MODULE = [sys.executable, "-m", "mergesearch.cli"]  # the same CLI, as a module


def cli_error(*args) -> str:
    """Run the CLI in-process on ``args``, expecting a user error: exit code 2, no
    traceback, one ``error:`` line, which is returned."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    errors = [ln for ln in output.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), output  # one message
    return errors[0]


def one_error(result) -> str:
    """The single `error:` line of a refused command; no traceback."""
    output = result.stdout + result.stderr
    assert result.exit_code == 2, (output, result.exception)
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


def assert_refused(result, message: str, tmp_path: Path) -> None:
    """A refused `merge`: exit code 2, one stderr line holding ``message``, no output."""
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


def merge_in_process(recipe: dict, tmp_path: Path):
    """`mergesearch merge` of ``recipe`` into ``tmp_path/out`` on the CPU, in-process."""
    return CliRunner().invoke(app, ["merge", str(write(recipe, tmp_path)), "--out", str(tmp_path / "out"),
                                    "--device", "cpu"])


def disk_full_at(limit: int):
    """For a child process: files larger than ``limit`` bytes cannot be written, and the
    write fails with EFBIG (SIGXFSZ ignored) as a full disk fails with ENOSPC."""
    import resource

    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec
