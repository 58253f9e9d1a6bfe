"""Errors that more than one layer raises or answers: the base of the layering, importing
nothing of Weir."""

from __future__ import annotations


class UnknownName(LookupError):
    """A service or version the config does not have (the admin API answers 404)."""


class StateWriteError(RuntimeError):
    """A runtime change that could not be persisted, and so was not made (500)."""
