"""The daemon: one per host, owning its devices, migrating them out and in.

service.py (the devices, migrations both ways, events), commands.py (the control
commands), listeners.py (the migration listener), runner.py (setup, signals,
cleanup), ownership.py (where each device's workload is, durably), protocol.py (the
QMP control protocol's pure core), control.py (its server), client.py (its client),
config.py (the daemon's TOML config; tomlreader.py reads it naming file:line: key,
devicetables.py checks its [[device]] tables), metrics.py (the Prometheus endpoint).
Uses the engine for each migration; knows nothing of the command line.
"""
