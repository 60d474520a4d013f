"""Device-control adapters: where balloon targets are applied.

Each adapter subclasses :class:`~autoscaler.adapters.base.Adapter` and applies a
:class:`~autoscaler.adapters.base.Target`; pick one by name with
``adapter.kind`` — ``dry-run`` (log only), ``mqtt`` (target commands for host agents), ``qmp``,
``libvirt``, ``firecracker`` (local devices) — or plug in your own (``module:Class`` or an entry
point in the ``balloon_autoscaler.adapters`` group).
"""

from autoscaler.adapters.base import (
    Adapter,
    AdapterContext,
    AdapterError,
    AdapterTimeout,
    DeviceAdapter,
    GuestReading,
    GuestUnavailable,
    Target,
    TargetRejected,
)

__all__ = [
    "Adapter",
    "AdapterContext",
    "AdapterError",
    "AdapterTimeout",
    "DeviceAdapter",
    "GuestReading",
    "GuestUnavailable",
    "Target",
    "TargetRejected",
]
