"""The toolstack and the harnesses: what people run, and what starts and measures the processes.

``hvemu`` (:mod:`.cli`, with :mod:`.top`), ``scripts/run.sh`` (:mod:`.run`),
``scripts/soak.sh`` (:mod:`.soak`), ``scripts/bench.sh`` (:mod:`.bench`) and
the trace tools (:mod:`.tracetools`, :mod:`.plots`).  Only this part may
import everything: the hypervisor, ``pager/`` and ``guest/``.
"""
