"""Static baseline: no ballooning — every guest keeps the memory it was provisioned with.

This is the reference every other policy is measured against: a fleet run without a balloon
autoscaler, where each guest owns its boot RAM (``ram_bytes``) all the time.

The policy proposes ``ram_bytes`` (deflate fully) rather than NaN (hold). Holding would keep
whatever balloon a guest happens to have — left over from another controller, an operator's
``virsh setmem`` or a boot-time ``currentMemory`` below ``memory`` — so the baseline would depend
on history. A static guest gets its provisioned memory, so "static" means *allocation = RAM*,
and memory reclaimed by any other policy is counted against that.
"""

from __future__ import annotations

from typing import ClassVar, Final

import numpy as np

from autoscaler.policy import Decision, FleetView, Policy

REASONS: Final = ("static: full allocation",)


class StaticPolicy(Policy):
    """Hold every guest at its full RAM (see module docstring). No parameters."""

    name: ClassVar[str] = "static"

    def __init__(self) -> None:
        pass

    def decide(self, view: FleetView) -> Decision:
        target = np.array(view.ram_bytes, dtype=np.float64)  # a copy: the view is read-only
        with np.errstate(invalid="ignore", divide="ignore"):
            pressure = view.demand_bytes / target
        return Decision(
            target_bytes=target,
            pressure=pressure,
            reason=np.zeros(len(view), dtype=np.int16),
            reasons=REASONS,
        )
