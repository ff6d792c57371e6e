"""Errors that the CLI turns into one clear line on stderr and exit code 2.

Why a dedicated type: every stage must name the file, the record and the field that is wrong, so a user
fixing a 100K-row release does not have to read a traceback.
"""

from __future__ import annotations


class DataError(Exception):
    """Bad input data: reported as `error: FILE: record R: field F: MESSAGE`, exit code 2."""

    def __init__(self, file: str, message: str, record: object = None, field: str | None = None):
        self.file = str(file)
        self.record = record
        self.field = field
        self.message = message
        super().__init__(self.line())

    def line(self) -> str:
        parts = [self.file]
        if self.record is not None:
            parts.append(f"record {self.record}")
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        parts.append(self.message)
        return ": ".join(parts)


class UsageError(Exception):
    """Bad arguments or configuration (exit code 2)."""
