"""The kit's own messages: one logger tree, one format.

Every kit message goes through ``logging.getLogger('bevkit')`` or a child (``bevkit.smoke``, ``bevkit.ops``,
``bevkit.bevdepth`` ...): :func:`get` returns one and installs, once, a handler that prints
``[bevkit smoke] message`` (``WARNING:`` before warnings) on the current ``sys.stdout``, where the launcher's
own output goes. Records still propagate, so pytest's ``caplog`` and an application's logging see them.

A Python warning is kept only where the kit reinterprets an argument the caller passed (an API-level notice,
as Lightning does), e.g. ``--precision 16`` on CPU.
"""
from __future__ import annotations

import logging
import sys

ROOT = "bevkit"


class _CurrentStdout(logging.StreamHandler):
    """A StreamHandler that writes to whatever sys.stdout is now (tests and tee-ing replace it)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "[" + record.name.replace(".", " ") + "] "
        level = "WARNING: " if record.levelno >= logging.WARNING else ""
        return prefix + level + record.getMessage()


def get(name: str = "") -> logging.Logger:
    """The kit logger ``bevkit`` (or its child ``bevkit.<name>``), with the kit's handler installed."""
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _CurrentStdout) for h in root.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(_Format())
        root.addHandler(handler)
        if root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
    return root.getChild(name) if name else root
