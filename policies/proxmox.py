"""Proxmox VE baseline: pvestatd's automatic ballooning, a host-level share allocator.

Source: repository ``proxmox/pve-manager``, ``PVE/Service/pvestatd.pm`` (``auto_balloning``,
run every ``$updatetime = 10`` s) and ``PVE/AutoBalloon.pm`` (``compute_alg1``); the per-VM
inputs come from ``PVE::QemuServer::vmstatus`` in ``proxmox/qemu-server`` (QMP
``query-balloon``: ``balloon`` = ``actual``, ``freemem`` = ``free_mem``, ``maxmem`` =
``max_mem``; ``balloon_min`` = the VM's ``balloon`` option; ``shares`` default 1000).

Per host, every cycle:

1. ``goal = int(memtotal × 80% − memused)`` — bytes to hand out to VMs (positive) or to take
   back (negative) so that the host sits at the target usage (``ballooning-target``, 80%).
2. Nothing happens unless ``|goal| > 10 MiB``: the dead band is on the *host* goal, not on each
   VM's change.
3. VMs are split into those under memory pressure (``freemem <= 25% of balloon_min``, or below
   their minimum) and those with enough free memory. A grow request goes first to the VMs under
   pressure, a shrink request first to the VMs with free memory; only if that makes no progress
   at all does the request go to every VM.
4. Within a list, ``change_func`` iterates: the pool above the minima, ``Σ(balloon −
   balloon_min) + rest``, is divided by shares, ``desired = balloon_min + int(pool / Σshares ×
   shares)``, clamped to ``[balloon_min, maxmem]``; each VM moves toward ``desired`` by at most
   ``maxchange`` = 100 MiB from its current balloon — VMs below their share grow only on a grow
   request, VMs above it shrink on either, so a grow request also evens out the VMs; ``rest``
   drops by the changes made; VMs at their share drop out. It stops when the request is met or
   a round changes nothing.
5. pvestatd sends ``balloon value=int(target)`` for each VM whose target differs from its
   current balloon.

Vectorised over the whole fleet: hosts are ``view.host_index`` groups, the per-host sums of a
round are ``np.bincount`` with weights, and each round updates every guest of every host at once
(the per-VM loop of ``change_func`` reads only the sums computed before it, so the order of VMs
within a round does not matter and the vectorised round is exact).

Mapping: ``balloon`` is the current allocation (``alloc_bytes``), ``maxmem`` is ``ram_bytes``,
``freemem`` is the guest's MemFree (``free-memory``; MemAvailable if MemFree is missing),
``memused`` is ``host_total − host_available``, ``shares`` is the guest's ``[guards.shares]``
entry (``view.shares``, 1000 — Proxmox's default — for guests not listed there). Proxmox has a
``balloon`` minimum per VM; we use one share of RAM for every guest (``min_share``). A guest
without memory stats counts as a VM whose balloon driver does not report (``next if
!$d->{balloon}``): it is left alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Final

import numpy as np

from autoscaler.policy import Decision, FleetView, Policy

MIB: Final = 2**20
MAX_ROUNDS: Final = 1000
"""``change_func`` loops until a round changes nothing; every change moves a guest's target
strictly within ±``max_change_bytes`` of its balloon, so it settles in a few rounds. The bound
only guards against a pathological input."""

REASONS: Final = (
    "hold: no host memory stats",
    "hold: no memory stats (balloon driver not reporting)",
    "hold: host {host_used_pct:.1f}% used, within {dead_band_mib:.0f} MiB of the "
    "{target_pct:.0f}% target",
    "proxmox: host {host_used_pct:.0f}% used > {target_pct:.0f}% target: shrink by shares",
    "proxmox: host {host_used_pct:.0f}% used < {target_pct:.0f}% target: grow by shares",
    "proxmox: rebalance by shares: shrink",
    "hold: at its share of the host",
)
R_NO_HOST, R_NO_STATS, R_DEAD_BAND, R_SHRINK, R_GROW, R_REBALANCE, R_AT_SHARE = range(7)


def _change_func(
    members: np.ndarray,
    request: np.ndarray,
    result: np.ndarray,
    *,
    host: np.ndarray,
    balloon: np.ndarray,
    balloon_min: np.ndarray,
    maxmem: np.ndarray,
    shares: np.ndarray,
    maxchange: float,
) -> np.ndarray:
    """``compute_alg1``'s ``change_func`` for every host at once; returns each host's ``rest``.

    ``members`` marks the guests of the list (idlist1, idlist2 or idlist), ``request`` is the
    per-host byte request (``$bytes``), ``result`` (``$res``, NaN = unset) is updated in place.
    """
    n_hosts = len(request)
    rest = request.copy()
    repeat = np.ones(n_hosts, dtype=bool)
    progress = np.ones(n_hosts, dtype=bool)
    done = ~members
    growing = request > 0
    for _ in range(MAX_ROUNDS):
        running = (rest != 0) & repeat & progress
        if not running.any():
            break
        live = ~done & running[host]
        current = np.where(np.isnan(result), balloon, result)
        idx = host[live]
        alloc_old = np.bincount(idx, weights=(current - balloon_min)[live], minlength=n_hosts)
        shares_total = np.bincount(idx, weights=shares[live], minlength=n_hosts)
        alloc_new = alloc_old + rest
        with np.errstate(invalid="ignore", divide="ignore"):
            desired = balloon_min + np.trunc(alloc_new[host] / shares_total[host] * shares)
        over = desired > maxmem
        under = ~over & (desired < balloon_min)
        desired = np.where(over, maxmem, np.where(under, balloon_min, desired))
        clamped = np.bincount(idx, weights=(over | under)[live], minlength=n_hosts) > 0

        grow = live & growing[host] & (desired - balloon > 0)
        shrink = live & ~grow & (desired - balloon < 0)
        done |= live & ~grow & ~shrink  # at its share: out of this list's later rounds
        step = np.where(
            grow,
            np.minimum(balloon + maxchange, desired),
            np.maximum(balloon - maxchange, desired),
        )
        diff = step - balloon
        update = (grow | shrink) & (diff != 0)
        change = np.where(update, step - current, 0.0)
        result[update] = step[update]
        changed = update & (change != 0)
        changes = np.bincount(host[changed], weights=change[changed], minlength=n_hosts)
        moved = np.bincount(host[changed], weights=np.abs(diff[changed]), minlength=n_hosts)

        rest = np.where(running, rest - changes, rest)
        repeat = np.where(running, clamped | (moved > 0), repeat)
        progress = np.where(running, moved > 0, progress)
    return rest


class ProxmoxPolicy(Policy):
    """Proxmox VE auto-ballooning (see module docstring for the source and the algorithm).

    Defaults, and why:

    - ``target_share=0.80``: pvestatd keeps the host at 80% used (node option
      ``ballooning-target``, default 80): 20% stays for the host, page cache and KSM slack.
    - ``max_change_bytes=100 MiB``: ``$maxchange`` — every 10 s cycle, so a VM moves by at most
      10 MiB/s, slow enough for the guest's reclaim to follow.
    - ``dead_band_bytes=10 MiB``: host goals within ±10 MiB are not acted on (``compute_alg1``).
    - ``min_share=0.5``: the ``balloon`` minimum as a share of RAM. Proxmox has no default (an
      unset minimum means the VM is not auto-ballooned at all, and the GUI proposes the full
      memory); half of RAM is a common setting, and keeps this baseline's worst case inside the
      guards' floors.
    - ``pressure_free_share=0.25``: a VM with MemFree at or below a quarter of its minimum is
      "under memory pressure" (``freemem > balloon_min * 0.25`` in ``compute_alg1``).
    """

    name: ClassVar[str] = "proxmox"
    param_docs: ClassVar[Mapping[str, str]] = {
        "target_share": "share of host memory in use that auto-ballooning aims at",
        "max_change_bytes": "largest change of one VM per cycle, in bytes",
        "dead_band_bytes": "host goals within this many bytes of the current use are not acted on",
        "min_share": "each VM's balloon minimum as a share of its RAM",
        "pressure_free_share": "MemFree at or below this share of the minimum is memory pressure",
    }
    host_aware: ClassVar[bool] = True

    def __init__(
        self,
        *,
        target_share: float = 0.80,
        max_change_bytes: float = 100 * MIB,
        dead_band_bytes: float = 10 * MIB,
        min_share: float = 0.5,
        pressure_free_share: float = 0.25,
    ) -> None:
        self.target_share = target_share
        self.max_change_bytes = max_change_bytes
        self.dead_band_bytes = dead_band_bytes
        self.min_share = min_share
        self.pressure_free_share = pressure_free_share

    def validate(self) -> None:
        if not 0 < self.target_share <= 1:
            raise ValueError(f"target_share must be in (0, 1], got {self.target_share}")
        if not self.max_change_bytes > 0:
            raise ValueError(f"max_change_bytes must be > 0, got {self.max_change_bytes}")
        if not self.dead_band_bytes >= 0:
            raise ValueError(f"dead_band_bytes must be >= 0, got {self.dead_band_bytes}")
        if not 0 < self.min_share <= 1:
            raise ValueError(f"min_share must be in (0, 1], got {self.min_share}")
        if not 0 <= self.pressure_free_share <= 1:
            raise ValueError(
                f"pressure_free_share must be in [0, 1], got {self.pressure_free_share}"
            )

    def decide(self, view: FleetView) -> Decision:
        n = len(view)
        ram = view.ram_bytes  # maxmem
        balloon = view.alloc_bytes  # QMP query-balloon "actual"
        freemem = view.stat("free-memory")
        freemem = np.where(np.isnan(freemem), view.stat("available-memory"), freemem)
        host_total = view.host_total_bytes
        host_used = host_total - view.host_available_bytes
        host_known = np.isfinite(host_total) & np.isfinite(host_used) & (host_total > 0)
        eligible = host_known & np.isfinite(freemem) & np.isfinite(balloon) & np.isfinite(ram)

        # Hosts are renumbered densely over this view so the per-host arrays stay small.
        # ``first`` is one row of each host, to read the host's columns from.
        _, first, host = np.unique(view.host_index, return_index=True, return_inverse=True)
        host = host.reshape(-1)
        with np.errstate(invalid="ignore"):
            goal_h = np.trunc(host_total[first] * self.target_share - host_used[first])
        goal_h = np.where(host_known[first], goal_h, 0.0)

        balloon_min = np.floor(self.min_share * ram)
        # Per guest, from [guards.shares]: the pool above the minima is split in proportion.
        shares = view.shares
        with np.errstate(invalid="ignore"):
            enough_free = (freemem > balloon_min * self.pressure_free_share) & (
                balloon >= balloon_min
            )
        idlist = eligible
        idlist1 = idlist & ~enough_free  # under memory pressure
        idlist2 = idlist & enough_free  # enough free memory

        grow_h = goal_h > self.dead_band_bytes
        shrink_h = goal_h < -self.dead_band_bytes
        request = np.where(grow_h | shrink_h, goal_h, 0.0)
        result = np.full(n, np.nan)

        def change(members: np.ndarray, bytes_h: np.ndarray) -> np.ndarray:
            return _change_func(
                members,
                bytes_h,
                result,
                host=host,
                balloon=balloon,
                balloon_min=balloon_min,
                maxmem=ram,
                shares=shares,
                maxchange=float(self.max_change_bytes),
            )

        # Grow requests serve the VMs under pressure first, shrink requests the VMs with free
        # memory first; a list that makes no progress hands the request to every VM.
        rest = change(np.where(grow_h[host], idlist1, idlist2), request)
        no_progress = (grow_h & (rest >= request)) | (shrink_h & (rest <= request))
        if no_progress.any():
            change(idlist & no_progress[host], np.where(no_progress, rest, 0.0))

        # pvestatd sends int($res) when it differs from the current balloon.
        target = np.trunc(result)
        target[target == balloon] = np.nan

        reason = np.full(n, R_AT_SHARE, dtype=np.int16)
        shrinking = target < balloon
        growing = target > balloon
        # A guest above its share shrinks on a grow request too; guests never grow on a shrink one.
        reason[shrinking] = np.where(shrink_h[host], R_SHRINK, R_REBALANCE)[shrinking]
        reason[growing] = R_GROW
        reason[~(grow_h | shrink_h)[host]] = R_DEAD_BAND
        reason[~eligible] = R_NO_STATS
        reason[~host_known] = R_NO_HOST
        target[~eligible] = np.nan

        with np.errstate(invalid="ignore", divide="ignore"):
            predicted = view.demand_bytes / np.where(np.isfinite(target), target, balloon)
            host_used_pct = host_used / host_total * 100.0
        detail = {
            "host_used_pct": host_used_pct,
            "target_pct": np.full(n, self.target_share * 100.0),
            "dead_band_mib": np.full(n, self.dead_band_bytes / MIB),
        }
        return Decision(target, predicted, reason, REASONS, detail)
