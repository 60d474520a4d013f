"""Device-control adapters: where balloon targets are applied.

Each adapter subclasses :class:`~autoscaler.adapters.base.Adapter`; pick one by name with
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
    "TargetRejected",
]
