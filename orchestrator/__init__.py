"""The orchestrator: what moves devices from one host to another, in four rooms.

Each room imports only the rooms below it (tests/test_quality.py checks it)::

    cli/      the ``livemig`` command line: commands, the live progress view
    service/  the daemon: devices owned, control API (QMP), config, metrics, listeners
    engine/   one migration, both ends: phases, convergence, parameters, stats, messages
    (transport, devices: the wire and the device contract, below the orchestrator)

``bench/`` sits beside them: benchmarks and the daemon-process harness the tests use.
No production module imports it; ``livemig bench`` and ``livemig demo`` load it by
name when run.
"""
