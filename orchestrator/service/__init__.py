"""The daemon: one per host, owning its devices, migrating them out and in.

daemon.py (the service, its control commands, listeners and runner), ownership.py
(where each device's workload is, durably), control.py (the QMP control protocol),
config.py (the daemon's TOML config), metrics.py (the Prometheus endpoint). Uses the
engine for each migration; knows nothing of the command line.
"""
