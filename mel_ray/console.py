"""What a run prints: a page on the terminal (one line per stage, the results, where to look next) and
everything else in a log file.

`setup(log_file)` once per command, as early as possible (some libraries read their settings from the
environment when imported):

- Python logging, INFO and up, of every logger (mel_ray, ray, ray.data, ray.train, ray.tune, mlflow,
  transformers, diffusers, ...) goes to `log_file`; the terminal gets mel_ray's warnings and everyone's errors.
  Libraries that attach their own console handler when imported (ray, ray.data, transformers, diffusers,
  mlflow) have it moved to the file by `tidy()`, which `setup` and `runtime.init_ray` call.
- Ray workers' output stays in Ray's session logs: `runtime.init_ray` passes log_to_driver=False (the log file
  names the session folder).
- Progress bars only on an interactive terminal: Ray Data draws live bars there (the global one per
  dataset); elsewhere it logs its progress, which lands in the file. Hugging Face download/load bars are off.

- Raylet notices (printed by Ray's error-listener thread, not by logging) reach the terminal, except the
  harmless ones of `runtime.HARMLESS_RAYLET_NOTICES`, which `runtime.init_ray` sends to the log file.
- Not routable: Ray's C++ core writes error lines straight to the process's stderr; Ray Data's actor pools
  trigger one per actor (ray-project/ray#57733, a false alarm about its own constructor arguments; README).

`--verbose` (MEL_RAY_VERBOSE=1 for jobs and subprocesses) keeps today's behaviour: everything on the terminal.

Every handler `setup` creates redacts credentials (mel_ray.redact) in all it writes, tracebacks included.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from mel_ray import redact

VERBOSE = "MEL_RAY_VERBOSE"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# loggers that libraries give their own console handler (and propagate=False) when they are imported
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "transformers", "diffusers",
                   "huggingface_hub")

_state: dict = {"file": None, "handlers": [], "moved": []}


def is_verbose() -> bool:
    return os.environ.get(VERBOSE) == "1"


def interactive() -> bool:
    """Progress bars only where a person watches them redraw (Ray Data itself checks stdout the same way)."""
    return sys.stdout.isatty()


def log_file() -> Path | None:
    """The file this process logs to (None: verbose, or setup() not called)."""
    handler = _state["file"]
    return Path(handler.baseFilename) if handler is not None else None


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (as logging's last-resort handler does)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _TerminalFilter(logging.Filter):
    """On the terminal: mel_ray's warnings and every library's errors; the rest is in the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or (record.levelno >= logging.WARNING
                                                   and record.name.split(".")[0] == "mel_ray")


class _RedactingFormatter(logging.Formatter):
    """The whole written line redacted (mel_ray.redact): the message, and also the traceback and stack that a
    filter on the record's message never sees (Ray logs a failed actor's traceback, URIs and all)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact.text(super().format(record))


def _redacting(handler: logging.Handler, fmt: str) -> logging.Handler:
    """Every handler this module creates redacts what it writes, whoever set it up (the CLI, a job, a test)."""
    handler.setFormatter(_RedactingFormatter(fmt))
    handler.addFilter(redact.RedactingFilter())       # the record too, for handlers after this one
    return handler


class _TorchvisionFallbackFilter(logging.Filter):
    """transformers 5 names its torchvision backend `CLIPImageProcessor` and, without torchvision (which mel-ray
    does not install), falls back to the PIL backend with a warning. The PIL backend is the one the features
    are defined by (mel_ray/features.py reproduces it bit for bit), so the fallback is intended: drop the warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


def quiet_libraries(verbose: bool) -> None:
    """Settings that must be in place before the libraries are imported (also inherited by local Ray workers)."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())
    if verbose:
        return
    # model download / load / save bars (huggingface_hub, and transformers reads the same switch); one
    # per model load, not per long stage; diffusers has no switch and is quieted where its pipelines load
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # MLflow otherwise gives its loggers a handler of their own on stdout ("Creating initial MLflow database
    # tables..."); without it they propagate here, to the log file
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    # Tune's new output engine prints its experiment box even at verbose=0; the legacy reporter honours 0
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # MLflow's artifact upload/download bars (the demo downloads the best model once per sweep)
    if not interactive():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if "transformers.utils.logging" in sys.modules:
        sys.modules["transformers.utils.logging"].disable_progress_bar()


def setup(path: str | os.PathLike | None, *, verbose: bool = False) -> Path | None:
    """Route this process's output (see the module doc); returns the log file (None when verbose or no path).
    Calling it again replaces the previous routing (tests, and a CLI call after another in one process)."""
    verbose = verbose or is_verbose()
    if verbose:
        os.environ[VERBOSE] = "1"       # jobs' subprocesses, and init_ray's log_to_driver
    quiet_libraries(verbose)
    reset()
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if verbose or path is None:
        terminal = _redacting(_Stderr(), FORMAT)
        _state["handlers"] = [terminal]
        root.addHandler(terminal)
        return None
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    file = _redacting(logging.FileHandler(path, encoding="utf-8"), FORMAT)
    file.setLevel(logging.INFO)           # Ray Data's logger passes DEBUG (its scheduler's state, every loop)
    terminal = _redacting(_Stderr(), "%(levelname)s %(name)s: %(message)s")
    terminal.addFilter(_TerminalFilter())
    _state.update(file=file, handlers=[file, terminal])
    root.addHandler(file)
    root.addHandler(terminal)
    tidy()
    return path


def reset() -> None:
    """Remove the handlers setup() added (tests)."""
    root = logging.getLogger()
    for handler in _state["handlers"]:
        root.removeHandler(handler)
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()
    for logger, handler in _state["moved"]:     # the libraries' own console handlers, as tidy() found them
        if handler not in logger.handlers:
            logger.addHandler(handler)
    _state.update(file=None, handlers=[], moved=[])


def tidy() -> None:
    """Move the console handlers that libraries attach to their own loggers to the log file; a no-op when
    verbose or without a log file. Call after importing such a library (init_ray does, for Ray)."""
    file = _state["file"]
    if file is None:
        return
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
                    and handler not in _state["handlers"]):
                logger.removeHandler(handler)
                _state["moved"].append((logger, handler))
        # records stop here: the file only (Ray logs a failed task's traceback at ERROR before the driver
        # raises it; the CLI's one-line error is what the terminal shows)
        if not logger.propagate and file not in logger.handlers:
            logger.addHandler(file)
    if "diffusers.utils.logging" in sys.modules:
        sys.modules["diffusers.utils.logging"].disable_progress_bar()


def default_log_file(folder: str | os.PathLike, command: str) -> Path:
    """<folder>/logs/<command>.log: the demo's output folder, --root for pipeline and tune, the current
    directory for the other commands and the jobs (under `ray job submit`: Ray's copy of the working dir)."""
    return Path(folder).absolute() / "logs" / f"{command}.log"
