"""Dry run: apply nothing. The safe first step on a new cluster.

Each target is logged once, by the controller's decision log (``autoscaler.decisions``), marked
"dry run, not applied"; this adapter only keeps the last one per guest.
"""

from __future__ import annotations

from typing import ClassVar

from autoscaler.adapters.base import Adapter, Target


class DryRunAdapter(Adapter):
    """Keeps the last target per guest in :attr:`targets`; applies nothing."""

    kind: ClassVar[str] = "dry-run"
    applies: ClassVar[bool] = False

    def __init__(self) -> None:
        self.targets: dict[tuple[str, str], int] = {}

    async def set_target(self, target: Target) -> None:
        self.targets[(target.host_id, target.guest_id)] = target.num_pages
