"""Errors of a migration as the orchestrator reports them.

::

    MigrationError                 a migration did not complete; ``reason`` says why
     +-- MigrationBlocked          refused before anything moved (setup blockers, bad parameters)
     +-- MigrationCancelled        cancelled by the user, a signal or the peer
     +-- ConvergenceFailed         pre-copy never fit the downtime budget before the timeout
     +-- DowntimeExceeded          the hard downtime limit aborted the switchover
     +-- DestinationFailed         the destination refused or failed to load the state
     +-- OutcomeUnknown            the link died after the commit: the destination may run
     +-- SplitOutcome              after the commit some destination devices did not resume

Every error except OutcomeUnknown and SplitOutcome guarantees the source devices are
RUNNING again; after those two the source devices stay stopped (the commit gave the
workload to the destination).
"""

from __future__ import annotations


class MigrationError(Exception):
    """A migration failed; the message says why and what to change."""


class MigrationBlocked(MigrationError):
    """The migration cannot start as asked; nothing was changed on either host."""

    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        #: The migration parameter at fault, when one is (a config error names its key).
        self.parameter = parameter


class MigrationCancelled(MigrationError):
    """The migration was cancelled; the source devices are RUNNING again."""


class ConvergenceFailed(MigrationError):
    """Pre-copy did not converge within the time allowed; the source keeps running."""


class DowntimeExceeded(MigrationError):
    """The switchover could not fit the hard downtime limit and was rolled back."""


class DestinationFailed(MigrationError):
    """The destination refused the devices or failed to load their state."""


class OutcomeUnknown(MigrationError):
    """The link failed after the destination was told to resume.

    The destination may be running the devices, so the source devices are left stopped
    rather than risk running the same workload twice.
    """


class SplitOutcome(MigrationError):
    """After the commit the destination resumed some devices and not others.

    The destination owns the workload; the devices that did not resume stay stopped
    there with their state, and the source devices stay stopped. ``failed`` maps each
    device that did not resume to the reason.
    """

    def __init__(self, message: str, failed: dict[str, str]) -> None:
        super().__init__(message)
        self.failed = failed
