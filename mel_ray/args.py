"""Argument types for the command line: a count given as `--shards 0` or `--top-k -1` is one line and exit 2
(argparse's own usage error), never a hang or a traceback deep inside a stage."""

from __future__ import annotations

import argparse

from mel_ray import redact


def count(minimum: int = 1):
    """An argparse `type` for counts: an integer >= minimum (`--shards 0`, `--top-k -1`, `--k true` refused)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got "
                                             f"{redact.excerpt(text, 40)}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse
