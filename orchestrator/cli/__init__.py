"""The ``livemig`` command line: parser.py (the grammar and the exit codes), commands.py
(the command table), follow.py (following a migration to its end), progress.py (the
live view).

A client of the daemon's control API; ``livemig daemon`` runs the service itself.
"""

from orchestrator.cli.commands import main

__all__ = ["main"]
