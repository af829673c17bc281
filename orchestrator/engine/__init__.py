"""One migration, both ends: what runs from the first DEVICES frame to the verdict.

source.py (the source's loop) and destination.py (the destination's), phases.py (the
phase machine both share), convergence.py (when to switch over), params.py (the
migration's parameters), stats.py (the stats, the meters and the downtime clock),
messages.py (the orchestrator's own messages on the wire, DEVICES and VERDICT typed),
p2p.py (the P2P resume order), errors.py (the error tree). Knows the transport and
the devices, nothing of daemons or command lines.
"""
