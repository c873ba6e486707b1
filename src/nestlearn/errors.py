"""Exceptions with messages that name the problem and the fix.

The CLI prints any :class:`NestlearnError` as one line and exits with status 2; everything else is
a bug and keeps its traceback.
"""

from __future__ import annotations


class NestlearnError(Exception):
    """Base class for user-facing errors (bad input, bad files, bad configs)."""


class ConfigError(NestlearnError):
    """Unknown config key, wrong value type, or an unknown named config."""


class DataError(NestlearnError):
    """Missing or empty corpus, unreadable data file, tokenizer mismatch."""


class CheckpointError(NestlearnError):
    """Missing, truncated, corrupt or mismatched checkpoint."""


class NonFiniteLossError(NestlearnError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


class NonFiniteMemoryError(NestlearnError):
    """A layer's in-context memory went NaN/inf (raised by ``model.check_finite=true``)."""


class SequenceTooLongError(NestlearnError):
    """An input is longer than the model's ``max_seq_len``."""


class RunLockedError(NestlearnError):
    """Another live process trains in the run folder (``RUN/.lock``); the message names it."""


class NestlearnWarning(UserWarning):
    """Something the user should know that does not stop the command (e.g. a corrupt newer
    checkpoint was skipped); the CLI prints it as one ``warning:`` line."""


class MissingDependencyError(NestlearnError):
    """An optional package is needed; the message carries the ``pip install`` line."""


def require(module: str, extra: str, pip_name: str | None = None):
    """Import an optional module lazily or raise a :class:`MissingDependencyError`.

    ``extra`` is the nestlearn extra that provides it, so the message can say
    ``pip install 'nestlearn[extra]'`` as well as the bare package name.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        name = pip_name or module
        raise MissingDependencyError(
            f"this feature needs the optional package '{name}': "
            f"pip install '{name}' (or pip install 'nestlearn[{extra}]')"
        ) from exc
