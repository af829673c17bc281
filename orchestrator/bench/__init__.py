"""Benchmarks, and the daemon-process harness the tests and examples drive.

inprocess.py (both ends on one event loop), daemons.py (two daemon processes, the
benchmark of record), netbench.py + netbed.py (the same across a shaped link in
network namespaces), transportbench.py (the transport alone), command.py (``livemig
bench`` and ``livemig demo``). No production module imports this package.
"""
