"""Print the combination-transition paths of the VFIO migration FSM for a feature set.

Usage: ``python examples/fsm_table.py [FLAG ...]`` with flags among STOP_COPY, P2P,
PRE_COPY (default: all three).
"""

from __future__ import annotations

import sys

from devices.fsm import Feature, describe

if __name__ == "__main__":
    features = Feature(0)
    for name in sys.argv[1:] or ["STOP_COPY", "P2P", "PRE_COPY"]:
        features |= Feature[name.upper()]
    print(describe(features))
