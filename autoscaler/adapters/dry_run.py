"""Dry run: log every target, apply nothing. The safe first step on a new cluster."""

from __future__ import annotations

import logging
from typing import ClassVar

from autoscaler.adapters.base import Adapter
from autoscaler.tick import TargetChange, describe

log = logging.getLogger(__name__)


class DryRunAdapter(Adapter):
    """Logs each target change and keeps the last one per guest in :attr:`targets`."""

    kind: ClassVar[str] = "dry-run"

    def __init__(self) -> None:
        self.targets: dict[tuple[str, str], int] = {}

    async def set_target(self, change: TargetChange) -> None:
        self.targets[(change.host_id, change.guest_id)] = change.num_pages
        if log.isEnabledFor(logging.INFO):
            log.info("dry run: %s", describe(change))
