"""The names the processes pass each other on their command lines, each spelled once.

Part of the contract (it imports nothing of the project): the hypervisor,
the built-in pager, the guest and every front end (``hvemu``, ``run.sh``,
the soak, the benchmarks) choose from these tuples, and the types say the
same to mypy.  What each name means lives with its code:
:mod:`hvemu.core.admission`, :mod:`pager.policy`, :mod:`guest.workload`.
"""

from __future__ import annotations

from typing import Literal, get_args

#: mem_event admission: the seed patch's rule, or claim a slot before producing (``hvemu start --admission``).
AdmissionPolicy = Literal["seed", "claim"]
ADMISSION_POLICIES: tuple[AdmissionPolicy, ...] = get_args(AdmissionPolicy)

#: How the built-in pager picks victims (``pager-attach --policy``): xenpaging's clock hand, or random.
VictimPolicyName = Literal["clock", "random"]
VICTIM_POLICIES: tuple[VictimPolicyName, ...] = get_args(VictimPolicyName)

#: A guest's access pattern (``guest --pattern``, ``run.sh --pattern``).
Pattern = Literal["sequential", "uniform", "hotcold", "phases"]
PATTERNS: tuple[Pattern, ...] = get_args(Pattern)
