"""Errors a user can fix.

Every problem with user input (a scenario file, a workload, a trace, a CLI
argument) is raised as :class:`DesimInputError` with one message that names the
field or the line and says what was expected. The CLI prints it on one line and
exits with status 2, before anything is written.
"""
from __future__ import annotations


class DesimInputError(Exception):
    """Bad user input: the message names the field (or file and line) and the fix."""


class DesimRunError(Exception):
    """A run that cannot go on (no cluster worker left, a task failed for good): the message says
    what finished and where it is kept. The CLI prints it on one line and exits with status 1."""


class DesimInterrupted(KeyboardInterrupt):
    """Ctrl-C during a multi-task run; the message says what finished and where it is kept."""
