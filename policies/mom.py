"""oVirt MOM baseline: the default auto-balloon rules of the Memory Overcommitment Manager.

Source: the balloon policy that vdsm installs for MOM, repository ``oVirt/vdsm``, file
``static/etc/vdsm/mom.d/02-balloon.policy`` (the same rules as ``doc/balloon.rules`` in
``oVirt/mom``, where an older copy has ``min`` instead of ``max`` for ``balloon_min`` and does not
recompute ``guest_free_percent`` in ``grow_guest``; we follow vdsm's, the one oVirt deploys).

Every policy interval MOM computes, per host,

    host_free_percent = Host.mem_free / Host.mem_available

(``HostMemory`` collector: ``mem_free`` = MemFree + Buffers + Cached, ``mem_available`` =
MemTotal). Below ``pressure_threshold`` every guest of the host is shrunk, otherwise grown:

- the free share a guest may keep scales with host pressure: ``guest_free_percent =
  min_guest_free_percent × host_free_percent / pressure_threshold``, and when the host is
  critical (``host_free_percent <= pressure_critical``) it becomes ``host_free_percent − 0.05``,
  i.e. negative: the guest is pushed below its used memory, into swap;
- ``guest_used_mem = balloon_cur − mem_unused`` and ``balloon_min = max(guest.balloon_min,
  guest_used_mem + guest_free_percent × balloon_cur)``;
- shrink: ``balloon_size = max(balloon_cur × (1 − max_balloon_change_percent), balloon_min)``,
  applied only if it is not above ``balloon_cur``;
- grow (only a ballooned guest, ``balloon_cur < balloon_max``): ``balloon_size =
  min(max(balloon_cur × (1 + max_balloon_change_percent), balloon_min), balloon_max)`` — the
  step limit bounds the shrink, not a grow back to the free-memory target;
- a change of at most ``min_balloon_change_percent × balloon_cur`` is skipped (MOM's
  ``change_big_enough``);
- vdsm's QoS rule then raises any guest below its guaranteed memory (``balloon_min``) to it.

Mapping to the fleet view: ``balloon_cur`` is the current allocation (``alloc_bytes``, QEMU's
``actual``), ``balloon_max`` is ``ram_bytes``, ``guest.balloon_min`` is ``guaranteed_share ×
ram_bytes``, and the host share is ``host_available_bytes / host_total_bytes`` (MemAvailable is
the kernel's own, better, estimate of MOM's MemFree + Buffers + Cached). MOM's ``mem_unused`` is
the guest's MemFree (virtio ``free-memory``); we use MemAvailable (``available-memory``) when the
guest reports it and MemFree otherwise. With MemFree, page cache counts as used, so a guest that
has read a few GiB of files would never be shrunk, which says more about the input than about
MOM's rules; MemAvailable is what the virtio balloon driver reports for exactly this question
(Linux 4.6+), and MemFree keeps older guests working. MOM averages stats over its sample window
(``StatAvg``); we use the latest sample, as the control tick already spaces decisions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Final

import numpy as np

from autoscaler.policy import Decision, FleetView, Policy

CRITICAL_FREE_OFFSET: Final = 0.05
"""Under critical host pressure a guest's free target is ``host_free_percent − 0.05`` (a
constant in the rules, not a tunable): negative, so guests give up memory they are using."""

REASONS: Final = (
    "hold: no host memory stats",
    "hold: no memory stats",
    "mom: host free {host_free_pct:.0f}% < {threshold_pct:.0f}%: shrink",
    "mom: host free {host_free_pct:.0f}% critical (<= {critical_pct:.0f}%): shrink into swap",
    "mom: host free {host_free_pct:.0f}%: grow toward {guest_free_pct:.0f}% guest free",
    "hold: change below {min_change_pct:.2f}% of the allocation",
    "hold: at full allocation",
    "hold: at its free-memory target",
    "mom: raise to guaranteed memory",
)
(
    R_NO_HOST,
    R_NO_STATS,
    R_SHRINK,
    R_CRITICAL,
    R_GROW,
    R_SMALL,
    R_FULL,
    R_AT_TARGET,
    R_GUARANTEE,
) = range(9)


class MomPolicy(Policy):
    """oVirt MOM's default balloon rules (see module docstring for the source and formulas).

    Defaults are MOM's own constants, and why MOM chose them:

    - ``pressure_threshold=0.20``: a host with less than a fifth of its RAM free is under
      pressure and takes memory from its guests.
    - ``pressure_critical=0.05``: below a twentieth free, swapping guests beats swapping (or
      OOM-killing on) the host.
    - ``min_guest_free_percent=0.20``: an unconstrained guest keeps a fifth of its allocation
      free; under pressure that share shrinks in proportion to the host's free share.
    - ``max_balloon_change_percent=0.05``: at most 5% of the allocation per interval when
      shrinking (and the ordinary grow step), so a guest's page reclaim keeps up.
    - ``min_balloon_change_percent=0.0025``: changes under 0.25% of the allocation are not worth
      a balloon operation.
    - ``guaranteed_share=0.0``: MOM's ``guest.balloon_min`` (oVirt's "guaranteed memory", libvirt
      ``memtune/min_guarantee``) as a share of RAM; libvirt reports 0 when unset.
    """

    name: ClassVar[str] = "mom"
    param_docs: ClassVar[Mapping[str, str]] = {
        "pressure_threshold": "host free share below which the host takes memory from its guests",
        "pressure_critical": "host free share below which guests give up memory they are using",
        "min_guest_free_percent": "free share of its allocation an unconstrained guest keeps",
        "max_balloon_change_percent": "largest change per interval, as a share of the allocation",
        "min_balloon_change_percent": "smallest change worth making, as a share of the allocation",
        "guaranteed_share": "guaranteed memory (MOM's guest.balloon_min) as a share of RAM",
    }
    host_aware: ClassVar[bool] = True

    def __init__(
        self,
        *,
        pressure_threshold: float = 0.20,
        pressure_critical: float = 0.05,
        min_guest_free_percent: float = 0.20,
        max_balloon_change_percent: float = 0.05,
        min_balloon_change_percent: float = 0.0025,
        guaranteed_share: float = 0.0,
    ) -> None:
        self.pressure_threshold = pressure_threshold
        self.pressure_critical = pressure_critical
        self.min_guest_free_percent = min_guest_free_percent
        self.max_balloon_change_percent = max_balloon_change_percent
        self.min_balloon_change_percent = min_balloon_change_percent
        self.guaranteed_share = guaranteed_share

    def validate(self) -> None:
        if not 0 < self.pressure_threshold <= 1:
            raise ValueError(f"pressure_threshold must be in (0, 1], got {self.pressure_threshold}")
        if not 0 <= self.pressure_critical < self.pressure_threshold:
            raise ValueError(
                "pressure_critical must be in [0, pressure_threshold), got "
                f"{self.pressure_critical}"
            )
        if not 0 <= self.min_guest_free_percent < 1:
            raise ValueError(
                f"min_guest_free_percent must be in [0, 1), got {self.min_guest_free_percent}"
            )
        if not 0 < self.max_balloon_change_percent < 1:
            raise ValueError(
                "max_balloon_change_percent must be in (0, 1), got "
                f"{self.max_balloon_change_percent}"
            )
        if not 0 <= self.min_balloon_change_percent < self.max_balloon_change_percent:
            raise ValueError(
                "min_balloon_change_percent must be in [0, max_balloon_change_percent), got "
                f"{self.min_balloon_change_percent}"
            )
        if not 0 <= self.guaranteed_share <= 1:
            raise ValueError(f"guaranteed_share must be in [0, 1], got {self.guaranteed_share}")

    def decide(self, view: FleetView) -> Decision:
        n = len(view)
        ram = view.ram_bytes  # balloon_max
        cur = view.alloc_bytes  # balloon_cur
        free = view.stat("available-memory")
        free = np.where(np.isnan(free), view.stat("free-memory"), free)  # mem_unused
        with np.errstate(invalid="ignore", divide="ignore"):
            host_free = view.host_available_bytes / view.host_total_bytes
        host_known = np.isfinite(host_free)
        guest_known = np.isfinite(free) & np.isfinite(cur) & np.isfinite(ram)

        pressure = host_free < self.pressure_threshold  # NaN compares False; masked below
        critical = host_free <= self.pressure_critical
        with np.errstate(invalid="ignore"):
            guest_free_percent = np.where(
                critical,
                host_free - CRITICAL_FREE_OFFSET,
                self.min_guest_free_percent * host_free / self.pressure_threshold,
            )
            guaranteed = self.guaranteed_share * ram
            used = cur - free
            balloon_min = np.maximum(guaranteed, used + guest_free_percent * cur)
            # shrink_guest: at most one step down, never below balloon_min, never up.
            shrink_size = np.maximum(cur * (1.0 - self.max_balloon_change_percent), balloon_min)
            # grow_guest: one step up or straight to balloon_min, capped at balloon_max.
            grow_size = np.minimum(
                np.maximum(cur * (1.0 + self.max_balloon_change_percent), balloon_min), ram
            )
            size = np.where(pressure, shrink_size, grow_size)
            big_enough = np.abs(size - cur) > self.min_balloon_change_percent * cur

        shrink_reason = np.where(critical, R_CRITICAL, R_SHRINK)
        reason = np.asarray(np.where(pressure, shrink_reason, R_GROW), dtype=np.int16)
        reason[pressure & ~(shrink_size <= cur)] = R_AT_TARGET
        reason[~pressure & ~(cur < ram)] = R_FULL
        moving = (reason == R_SHRINK) | (reason == R_CRITICAL) | (reason == R_GROW)
        reason[moving & ~big_enough] = R_SMALL
        target = np.where(
            (reason == R_SHRINK) | (reason == R_CRITICAL) | (reason == R_GROW), size, np.nan
        )
        # vdsm's guest_qos rule runs after the balloon rules and wins.
        below_guarantee = cur < guaranteed
        target[below_guarantee] = guaranteed[below_guarantee]
        reason[below_guarantee] = R_GUARANTEE

        reason[~guest_known] = R_NO_STATS
        reason[~host_known] = R_NO_HOST
        target[~(guest_known & host_known)] = np.nan

        with np.errstate(invalid="ignore", divide="ignore"):
            predicted = view.demand_bytes / np.where(np.isfinite(target), target, cur)
        detail = {
            "host_free_pct": host_free * 100.0,
            "guest_free_pct": guest_free_percent * 100.0,
            "threshold_pct": np.full(n, self.pressure_threshold * 100.0),
            "critical_pct": np.full(n, self.pressure_critical * 100.0),
            "min_change_pct": np.full(n, self.min_balloon_change_percent * 100.0),
        }
        return Decision(target, predicted, reason, REASONS, detail)
