"""`mel-ray` commands run in-process for tests that read their error lines."""

from __future__ import annotations

from pathlib import Path

from mel_ray import cli, console


def run_cli(tmp_path: Path, capsys, *args: str) -> tuple[int, str, list[str]]:
    """cli.main with the log in tmp_path; (exit code, stdout, its error and traceback lines on stderr).

    The test cluster forwards the workers' own output to this stderr (log_to_driver); what the command itself
    says about a failure is its "error: ..." line, and it never prints a traceback."""
    try:
        code = cli.main([*args, "--log-file", str(tmp_path / "cli.log")])
    finally:
        console.reset()
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.startswith(("error:", "Trace"))]
