"""The package's errors: every specific error derives from :class:`ReproError`, so callers can
catch everything this package raises on bad input in one ``except``.

Each also derives from the builtin it refines (``ValueError`` for bad settings, ``RuntimeError``
for files that cannot be used), so code written against the builtins keeps working.
"""


class ReproError(Exception):
    """Base of every error this package raises on purpose."""


class ParamsError(ReproError, ValueError):
    """A params file (or notebook parameters) failed validation."""


class SlideError(ReproError, RuntimeError):
    """A slide could not be opened or read; the message starts with the file's path."""


class NoTissueError(ReproError, ValueError):
    """The tissue mask of a slide is empty."""


class CheckpointError(ReproError, RuntimeError):
    """A checkpoint is missing, unreadable or inconsistent."""


class NonFiniteError(ReproError, FloatingPointError):
    """A loss, gradient or weight became NaN or inf; no checkpoint was written for it."""


class NotebookFailedError(ReproError, RuntimeError):
    """A notebook of the pipeline raised; the message names it and the failing cell's error."""
