"""The device contract and its backends: the lowest layer, importing nothing of livemig.

fsm.py (the VFIO migration states, arcs and table), base.py (MigratableDevice, the
contract), errors.py, paged.py + simulated.py + ram.py (models), stream.py (their
stream format), vfio/ (the kernel's VFIO uAPI), vfio_user/ (the vfio-user client),
testing.py (helpers for the tests).
"""
