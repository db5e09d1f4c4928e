"""What every refusal must look like on the command line: exit status 2 and exactly one line `Error: ...`."""

from __future__ import annotations


def one_error_line(done, *parts: str) -> str:
    """The single `Error:` line of a finished CliRunner/subprocess result, checked to hold every `part`."""
    assert done.exit_code == 2, (done.exit_code, done.output)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]
