"""Credentials never reach an output: one helper for every URI that is printed, logged, raised or tracked.

`uri(text)` removes the userinfo of a URI (`http://user:PASS@host/` -> `http://[redacted]@host/`, any scheme) and
the values of query parameters that look like secrets (`X-Amz-Signature`, `X-Amz-Credential`, `token`,
`password`, `sig`, `api_key`, ...). `text(message)` does the same for every URI found inside free text (an
exception message, a log line). Both are idempotent and leave text without credentials unchanged, so they
can be applied to anything before it is shown.

The real URI is still what the clients use: MLflow's `requests` session, for one, takes basic-auth
credentials from the userinfo of the tracking URI. Redact at the edge (print, log, error, param, tag), never
the value that is used to connect.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

MASK = "[redacted]"

# scheme://userinfo@ : the userinfo is everything from "://" up to the LAST "@" of the same word, whatever it
# holds. Not a URI parser on purpose: real secrets hold "/", "?", "#" or an unescaped "@" (AWS secret keys often
# hold "/"), and a parser then finds the host inside the secret and prints the rest. A path that holds an "@"
# is masked too (shown as [redacted]@...): showing too little is the safe side.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s\"<>`]*)@")
# key=value in a query string (or a fragment: OAuth implicit flows put tokens there)
_QUERY_PARAM = re.compile(r"(?P<lead>[?&#;])(?P<key>[^=&#;\s'\"<>]+)=(?P<value>[^&#;\s'\"<>]*)")
_SECRET_PARAM_WORDS = ("signature", "credential", "token", "password", "passwd", "pwd", "secret", "apikey",
                       "api_key", "api-key", "access_key", "accesskey", "auth", "sig", "key")
_EXACT_NOT_SECRET = {"x-amz-algorithm", "x-amz-date", "x-amz-expires", "x-amz-signedheaders"}


def _secret_param(key: str) -> bool:
    k = key.lower()
    if k in _EXACT_NOT_SECRET:
        return False
    if k in ("sig", "key", "auth", "code"):
        return True
    return any(w in k for w in _SECRET_PARAM_WORDS if len(w) > 3)


def _mask_query(match: re.Match[str]) -> str:
    if _secret_param(match.group("key")) and match.group("value") not in ("", MASK):
        return f"{match.group('lead')}{match.group('key')}={MASK}"
    return match.group(0)


def _mask_userinfo(match: re.Match[str]) -> str:
    return f"{match.group('scheme')}{MASK}@"


def strip_userinfo(uri: str) -> str:
    """`uri` without its userinfo (what a client may connect to: S3 credentials are the AWS_* keys)."""
    return _USERINFO.sub(lambda m: m.group("scheme"), uri)


def has_userinfo(uri: str) -> bool:
    return _USERINFO.search(uri) is not None


def uri(value: object) -> str:
    """A URI (or a path) with userinfo and secret-looking query values replaced by `[redacted]`."""
    return text(value)


def text(value: object) -> str:
    """Free text with the credentials of every URI in it replaced by `[redacted]`."""
    s = str(value)
    if "@" in s:
        s = _USERINFO.sub(_mask_userinfo, s)
    if "=" in s:
        s = _QUERY_PARAM.sub(_mask_query, s)
    return s


def excerpt(value: object, limit: int = 200) -> str:
    """`repr(value)`, redacted and cut to `limit` characters, without building a huge repr first.

    reprlib bounds the depth and width it walks, so a YAML alias bomb (a few lines that expand to gigabytes of
    nested lists) costs nothing here.
    """
    import reprlib

    class _Repr(reprlib.Repr):
        def repr_int(self, x: int, level: int) -> str:
            try:
                return super().repr_int(x, level)
            except ValueError:   # more digits than Python converts to text (sys.get_int_max_str_digits)
                return f"<an integer of about {int(x.bit_length() * 0.30103) + 1} digits>"

    r = _Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 8, 8, 8, 8
    r.maxstring, r.maxother, r.maxlong = limit, limit, 60
    out = text(r.repr(value))
    return out if len(out) <= limit else out[: limit - 3] + "..."


class RedactingFilter(logging.Filter):
    """A logging filter that redacts URIs in the final message (attach it to handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is logging's problem, not ours
            return True
        clean = text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_filter(logger: logging.Logger | None = None) -> None:
    """Add a RedactingFilter to every handler of `logger` (default: root) that lacks one."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


class RedactingStream:
    """A text stream wrapper that redacts what is written (a backstop for prints and tracebacks).

    Line-buffered on purpose: a URI split over two `write` calls (print writes the text, then "\\n") is
    redacted whole. Everything else (fileno, isatty, encoding, buffer) is the wrapped stream's.
    """

    def __init__(self, stream: Any):
        self._stream = stream
        self._pending = ""

    def write(self, s: str) -> int:
        self._pending += s
        end = max(self._pending.rfind("\n"), self._pending.rfind("\r"))   # "\r": a live progress bar's redraw
        if end >= 0:
            done, self._pending = self._pending[:end + 1], self._pending[end + 1:]
            self._stream.write(text(done))
        return len(s)

    def flush(self) -> None:
        if self._pending:
            self._stream.write(text(self._pending))
            self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_output() -> Iterator[None]:
    """While active, sys.stdout / sys.stderr redact credentials in everything written through them."""
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(old[0]), RedactingStream(old[1])
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = old
