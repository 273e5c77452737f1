"""The root of every error molmoe-lite raises on purpose.

Each module defines the errors of its own job (``ConfigError`` in ``config``,
``CheckpointError`` in ``quantize.checkpoint``, ...) and derives them from
``MolmoeLiteError``, so a caller can catch everything the package reports about bad
input with one ``except``, and the CLI can tell a reported problem (one line, exit 2)
from a bug (a traceback). This module imports nothing, so every layer may use it,
``quantize`` and ``kernels`` included.
"""

from __future__ import annotations


class MolmoeLiteError(Exception):
    """A problem molmoe-lite detected and can explain: bad input, a missing file, a wrong setting."""


class UsageError(MolmoeLiteError, ValueError):
    """An argument out of range, or options that do not go together (a ``ValueError`` too)."""
