"""Errors that a user can fix: bad input, bad configuration, a run folder in use.

``hiad-pl`` reports a :class:`UserError` in one line and exits with status 2;
any other exception is an internal error (status 1, traceback with
``--verbose true``). Each class also derives from the built-in exception a
caller would expect (``ValueError``, ``OSError``), so ``except ValueError``
keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class of errors caused by input, configuration or the environment, not by hiad-pl."""


class ConfigError(UserError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class ConfigTypeError(ConfigError, TypeError):
    """A configured object has the wrong kind (an evaluator that is not callable, ...)."""


class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained backbone weights cannot be loaded (no network, package missing)."""


class InputError(UserError, ValueError):
    """An input file or folder is missing, unreadable or inconsistent."""


class MissingFileError(InputError, FileNotFoundError):
    """A file or folder that a command needs does not exist (a run folder, weights, a texture folder)."""


class ImageReadError(InputError):
    """An image or mask file is missing, unreadable, truncated or inconsistent."""


class DatasetError(InputError):
    """A data set folder or list is missing, empty or malformed."""


class CheckpointError(InputError):
    """A checkpoint in a run folder cannot be read (truncated, corrupt, not a checkpoint)."""


class RunFolderLockedError(UserError, RuntimeError):
    """Another live process is using the run folder."""


class WriteError(UserError, OSError):
    """A result could not be written (disk full, read-only folder); what was there is unchanged."""


class PredictionError(InputError):
    """Some images of a ``predict`` run could not be scored (the others were)."""
