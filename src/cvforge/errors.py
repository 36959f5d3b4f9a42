"""User-facing errors.

A user's mistake (missing file, malformed annotation, bad option) is raised as a
``CvforgeError``; the command line prints it as one line
``cvforge: error: <what>, <where> — <how to fix>`` and exits with status 2, never a traceback.
Inside the package we trust invariants and let programming errors raise normally.
"""
from __future__ import annotations

import os


class CvforgeError(Exception):
    """An error the user can act on: what went wrong, where, and how to fix it."""

    def __init__(self, what: str, where: str | os.PathLike | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, (str(where) if where is not None else None), fix
        super().__init__(self.line())

    def line(self) -> str:
        text = self.what
        if self.where:
            text += f", {self.where}"
        if self.fix:
            text += f" — {self.fix}"
        return text


class DataError(CvforgeError):
    """A problem with a user's data: an image, an annotation file or a data YAML."""
