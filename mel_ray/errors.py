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

    def __reduce__(self):
        # pickled by its state, not by re-calling __init__ with self.args (the line): Ray ships exceptions raised
        # in tasks and actors to the driver this way, and would otherwise only say it cannot deserialize them
        return _restore, (type(self), self.args, dict(self.__dict__))

    def line(self) -> str:
        return one_line(self.file, self.message, where=None if self.record is None else f"record {self.record}",
                        field=self.field)


class UsageError(Exception):
    """Bad arguments or configuration (exit code 2)."""


def _restore(cls: type, args: tuple, state: dict) -> BaseException:
    err = cls.__new__(cls, *args)
    err.args = args
    err.__dict__.update(state)
    return err


class NonFiniteError(DataError):
    """Scores or a loss that are NaN or infinite: the run stops rather than report a number computed from them.

    `rows`: how many rows (mentions) were affected, where that is known."""

    def __init__(self, file: str, message: str, rows: int | None = None, **kwargs):
        self.rows = rows
        super().__init__(file, message, **kwargs)


def unwrap(err: BaseException, types: tuple[type, ...] = ()) -> BaseException:
    """The DataError / UsageError (or one of `types`) that a Ray task, actor, Ray Data UDF, Ray Train worker or
    Tune trial raised, out of the wrappers Ray puts around it (RayTaskError and its dual `RayTaskError(X)`
    classes, ActorDiedError, UserCodeException, WorkerGroupError, UserExceptionWithTraceback, ControllerError,
    TuneError); `err` itself when there is none."""
    found = _find(err, (DataError, UsageError, *types), set())
    return found if found is not None else err


def _find(err: BaseException | None, types: tuple[type, ...], seen: set[int]) -> BaseException | None:
    if err is None or id(err) in seen:
        return None
    seen.add(id(err))
    wrapper = "RayTaskError" in type(err).__name__     # Ray's dual class is also an instance of the cause's
    cause = err.__dict__.get("cause") if wrapper else None
    if isinstance(err, types) and not wrapper:
        return err
    worker_failures = err.__dict__.get("worker_failures") or {}
    inner = [cause, err.__dict__.get("_base_exc"), err.__dict__.get("controller_failure"),
             *(worker_failures.values() if isinstance(worker_failures, dict) else ()), err.__cause__,
             err.__context__]
    for candidate in inner:
        if isinstance(candidate, BaseException):
            found = _find(candidate, types, seen)
            if found is not None:
                return found
    return _from_text(err)


def _from_text(err: BaseException) -> BaseException | None:
    """An actor whose __init__ raised reaches the driver as ActorDiedError, which keeps the cause only as the text
    of its traceback: its last `mel_ray.errors.<Error>: <line>` line is the one line."""
    import re

    if not type(err).__name__.startswith(("ActorDiedError", "RayActorError")):
        return None
    pattern = r"^(?:mel_ray\.errors\.)?(DataError|UsageError|NonFiniteError): (.+)$"
    lines = re.findall(pattern, str(err), re.MULTILINE)
    if not lines:
        return None
    kind, line = lines[-1]
    return UsageError(line) if kind == "UsageError" else _Line(line)


class _Line(DataError):
    """A DataError known only by its line (recovered from a traceback's text)."""

    def __init__(self, line: str):
        Exception.__init__(self, line)
        self.file, self.record, self.field, self.message, self._line = "", None, None, line, line

    def line(self) -> str:
        return self._line


def one_line(file: str, message: str, *, where: str | None = None, field: str | None = None) -> str:
    """`FILE: where: field 'F': message`, the one line every data error and verify problem is printed as."""
    parts = [file]
    if where is not None:
        parts.append(where)
    if field is not None:
        parts.append(f"field '{field}'")
    parts.append(message)
    return ": ".join(parts)
