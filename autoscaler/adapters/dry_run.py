"""Dry run: apply nothing. The safe first step on a new cluster.

Each target is logged once, by the controller's decision log (``autoscaler.decisions``), marked
"dry run, not applied"; this adapter only keeps the last one per guest.
"""

from __future__ import annotations

from typing import ClassVar

from autoscaler.adapters.base import Adapter
from autoscaler.tick import TargetChange


class DryRunAdapter(Adapter):
    """Keeps the last target per guest in :attr:`targets`; applies nothing."""

    kind: ClassVar[str] = "dry-run"
    applies: ClassVar[bool] = False

    def __init__(self) -> None:
        self.targets: dict[tuple[str, str], int] = {}

    async def set_target(self, change: TargetChange) -> None:
        self.targets[(change.host_id, change.guest_id)] = change.num_pages
