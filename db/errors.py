"""The errors of the storage layer, apart from the code that raises them so that callers (and test fakes)
can handle them without importing the database driver."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error the store raises."""


class DatabaseUnavailable(StoreError):
    """The server cannot be reached (down, restarting, overloaded); nothing was saved, retry later."""


class PredictionNotFound(StoreError, LookupError):
    """No prediction has this id."""


class InvalidLabel(StoreError, ValueError):
    """A true label must be an integer digit 0-9."""


class InvalidPrediction(StoreError, ValueError):
    """A prediction breaks a rule of the schema (digit range, probabilities, PNG, key, ...)."""


class Forbidden(StoreError, PermissionError):
    """The label token given does not match the prediction's (or the row has none): not its owner."""
