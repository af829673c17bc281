"""``python -m orchestrator.cli``: the ``livemig`` command."""

import sys

from orchestrator.cli.commands import main

sys.exit(main())
