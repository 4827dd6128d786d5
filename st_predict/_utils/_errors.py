"""The one exception type for bad input, so that a bug (any other exception) keeps its traceback.

Every check of the user's data, arguments and files raises :class:`InputError` (a ``ValueError``)
where the input enters. The command line prints an ``InputError`` as one line and exits 2, and shows
anything else with its traceback and exit 1. Three subclasses keep the built-in type that a lookup
or a missing file raised before, so ``except KeyError`` / ``except FileNotFoundError`` /
``except TypeError`` in users' code keep working.
"""

from __future__ import annotations


class InputError(ValueError):
    """The input cannot be used: a missing key or file, a wrong value, an unreadable image. The
    message names the key, section or value and, where there is one, the fix."""


class MissingKeyError(InputError, KeyError):
    """A key of the user's data (an ``obs`` column, an ``obsm`` entry, a section, an image) is missing."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class MissingFileError(InputError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong kind (e.g. a slide that is neither a path nor an image object)."""


class InputWarning(UserWarning):
    """The input can be used, but not as well as it looks: a slide scanned coarser than the model's tiles,
    patches on background. ``predict_slides`` records these in its manifest's ``warning`` column."""
