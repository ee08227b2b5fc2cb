"""The package's exception classes, one module at the bottom of the package so that every layer can
raise and catch them without importing the layer that happens to raise them first.

Each error's message is one line a user can act on; the CLI prints it as ``segdiff <command>: error:
<message>`` and the MONAI Label app returns it as the reason of a refused request. The classes are
also importable from their former modules (``transforms.InputError``, ``config.CheckpointError``,
``data.DataError``, ``distributed.DistributedError``, ``bundle.BundleError``, ``cli.CLIError``).
"""

from __future__ import annotations

__all__ = ["BundleError", "CLIError", "CheckpointError", "DataError", "DistributedError", "InputError"]


class InputError(ValueError):
    """An image or label that cannot be used, with a one-line reason."""


class DataError(ValueError):
    """A studies folder that cannot be used (missing, not a directory, no images)."""


class CheckpointError(ValueError):
    """A file that is not a monai-segdiff checkpoint, or one that cannot be used as asked."""


class DistributedError(RuntimeError):
    """A rank of a multi-process run failed; the message is its error's last line."""


class BundleError(ValueError):
    """A bundle that cannot be written or run as asked (one-line reason)."""


class CLIError(Exception):
    """A user error of the ``segdiff`` command line: printed as one line, exit code 2."""
