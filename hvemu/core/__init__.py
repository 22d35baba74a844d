"""The hypervisor core: domains, vCPUs, p2m, paging and the mem_event rings, sans I/O.

No asyncio, sockets or shared-memory imports here: the core decides and the
hypervisor daemon (:mod:`hvemu.hypervisor.daemon`) carries out the effects it emits.
Start at :class:`hvemu.core.hypervisor.Hypervisor`.
"""
