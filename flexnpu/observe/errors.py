"""What can stop the observer, each with its own exit code and a one-line message that
says what to do."""

from __future__ import annotations


class ObserveError(Exception):
    """A failure the user can act on. exit_code is what the command exits with."""

    exit_code = 1


class NoSuchProcess(ObserveError):
    exit_code = 3


class NoRuntimeLibrary(ObserveError):
    exit_code = 4


class NoPrivileges(ObserveError):
    exit_code = 5


class BpfUnavailable(ObserveError):
    exit_code = 6


class BccMissing(ObserveError):
    exit_code = 7


EXIT_CODES = {c.__name__: c.exit_code for c in (NoSuchProcess, NoRuntimeLibrary, NoPrivileges,
                                                  BpfUnavailable, BccMissing)}
