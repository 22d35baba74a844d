"""The hypervisor process: the control server's handlers, each domain's segments, rings and exit page.

``python -m hvemu.hypervisor.daemon`` (``hvemu start``) runs it.  It drives
the sans-I/O core (:mod:`hvemu.core`) and moves bytes and fds for it; it
imports the contract (``hvemu.abi``, ``ring``, ``evtchn``, ``protocol``...)
and the core, never the toolstack, ``pager/`` or ``guest/``
(``tests/unit/test_layout.py`` keeps that true).
"""
