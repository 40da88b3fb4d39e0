"""Bad input at the command line as one line: Hydra's composition errors (a misspelled choice, a value of the wrong
type, an unknown setting or option) reworded the way the harness's own `ConfigError`s read.

Imports only Hydra's and OmegaConf's exception classes, so `run.py` stays fast on the error path."""

from __future__ import annotations

import os

from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

USAGE_ERROR_EXIT = 2  # argparse's code for a usage error


def traceback_requested(argv: list[str]) -> bool:
    """`LORALAB_TRACEBACK=1` or Hydra's `hydra.verbose=<true|logger names>` asks for the full traceback."""
    if os.environ.get("LORALAB_TRACEBACK", "") not in ("", "0"):
        return True
    verbose = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0].lstrip("+") == "hydra.verbose" and "=" in a]
    return any(v.lower() not in ("false", "", "[]", "null") for v in verbose)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].rstrip(".") if text.strip() else ""


def composition_error_line(exc: CompactHydraException) -> str:
    """One line naming the bad value and what is allowed, from Hydra's multi-line report."""
    cause = exc.__cause__
    if isinstance(exc, MissingConfigException) and exc.options:  # variant=nope: a missing group option
        group, _, name = str(exc.missing_cfg_file).rpartition("/")
        what = f"{group}={name}" if group else repr(exc.missing_cfg_file)
        return f"{what}: no such option; {group or 'options'}: {', '.join(exc.options)}"
    if isinstance(exc, OverrideParseException):  # train.lr=[ : not Hydra's override grammar
        return f"{exc.override}: {_first_line(exc.message)} (override syntax: key=value, +key=value, ~key)"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:  # a key the schema lacks
        parent, _, _ = cause.full_key.rpartition(".")
        known = [k for k in (cause.parent_node.keys() if cause.parent_node is not None else []) if k != "hydra"]
        return f"unknown setting {cause.full_key!r}; {parent or 'the top level'} has: {', '.join(map(str, known))}"
    head = _first_line(str(exc)).removeprefix("Error merging override ")
    if isinstance(cause, OmegaConfBaseException):  # a value outside a choice's values, or of the wrong type
        return f"{head}: {_first_line(str(cause))}"
    return head
