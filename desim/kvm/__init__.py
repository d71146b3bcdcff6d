"""Ground truth from the real KVM of this host: a minimal VMM, its counters, scenarios and CLI.

Modules, one concept each:

* :mod:`~desim.kvm.uapi` — ioctl numbers, constants and struct layouts (``include/uapi/linux/kvm.h``);
* :mod:`~desim.kvm.libc` — ``ioctl``/``mmap``/``madvise`` through ctypes (GIL released);
* :mod:`~desim.kvm.vm` — ``/dev/kvm``, VM, memslots, vCPUs as context managers;
* :mod:`~desim.kvm.stats` — the binary stats of ``KVM_GET_STATS_FD``;
* :mod:`~desim.kvm.guest` — the hand-assembled touch loop and identity-mapped page tables;
* :mod:`~desim.kvm.scenario` — scenarios in the simulator's vocabulary and their layout;
* :mod:`~desim.kvm.machine` — one scenario VM with a thread per vCPU;
* :mod:`~desim.kvm.spin` — busy-looping the other CPUs while memslot ioctls are timed;
* :mod:`~desim.kvm.measure` — phases, metrics, both policies, summaries;
* :mod:`~desim.kvm.probe` — what the host's KVM offers;
* :mod:`~desim.kvm.latency` — per-access latency from the rdtsc-timed guest, by class;
* :mod:`~desim.kvm.simbridge`, :mod:`~desim.kvm.calibrate`, :mod:`~desim.kvm.fitdist`,
  :mod:`~desim.kvm.validate`, :mod:`~desim.kvm.validate_tails` — the same scenarios in the
  simulator, fitted host-profile costs and their distributions, real versus simulated (metrics
  and latency tails);
* :mod:`~desim.kvm.cli` — ``desim kvm probe|measure|calibrate|validate``.

The harness (everything up to :mod:`~desim.kvm.probe`) uses only the standard library; the
simulator bridge imports the simulator, and latency, calibrate, fitdist and validate_tails use
numpy (percentiles, least squares, bootstrap).
"""
from __future__ import annotations
