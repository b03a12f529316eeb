"""What each GPU is doing, defined once: the agent exports it and everything else reads it.

Every collection puts each GPU the agent lists in exactly one state (``rayrack_gpu_state``, a one-hot set):

* ``busy``: processes hold it and its activity is at or above ``guard.idle_threshold``, or below it for less
  than ``guard.window`` so far (``rayrack_gpu_idle_run_seconds`` shows how long);
* ``idle_held``: processes hold it and its activity stayed below ``guard.idle_threshold`` for the whole
  ``guard.window`` (and ``guard.min_samples`` samples), with no gap over ``guard.max_gap``;
* ``free``: it was read and no compute process holds it;
* ``unknown``: it was not read this time (a timeout, an NVML error, the library down), or its process list or
  activity could not be read (MIG, an unreadable field): whether it computes is not known;
* ``lost``: NVML says the GPU is lost (``GPU_IS_LOST``: it fell off the bus or the driver dropped it).

Activity is ``guard.signal`` (see :func:`ray_agent.guard.tracker.activity`). The settings are the guard's,
and the states are the same whether or not the guard acts on them (``guard.enabled``): the status CLI, the
recording rules, the alerts and the dashboards keep no threshold of their own.
"""

from __future__ import annotations

import enum


class GpuState(enum.StrEnum):
    BUSY = "busy"
    IDLE_HELD = "idle_held"
    FREE = "free"
    UNKNOWN = "unknown"
    LOST = "lost"


# The guard's settings that judge each GPU's state: they reach the agent whether or not the guard acts.
STATE_SETTINGS = ("idle_threshold", "signal", "window", "min_samples", "max_gap")

# NVML errors that mean the GPU itself is gone rather than a read that failed.
LOST_ERRORS = frozenset({"GPU_IS_LOST"})
