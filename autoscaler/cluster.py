"""Scale-out: several controller replicas split one fleet by host, without two steering a guest.

Each replica with a ``controller.replica_id`` announces itself with a retained ``online`` on
``{prefix}/controller/{replica_id}/alive``; its MQTT will (and a clean shutdown) replaces that
with ``offline``. Every replica follows those topics and assigns each host to one live replica
by rendezvous (highest-random-weight) hashing of (replica, host): all replicas compute the same
owner from the same live set, and when a replica joins or leaves only the hosts it gains or
loses move.

Failure behaviour: when a replica dies, the broker publishes its will once the keepalive
(``mqtt.keepalive_s``) runs out; the other replicas then take over its hosts and start steering
them from fresh samples (rates need two). Until then those guests keep their last target,
which is safe: a balloon that is not moved neither starves nor frees anything. While the live
set changes, two replicas may briefly disagree about one host and both send it a target;
targets are absolute, so the next tick of the rightful owner settles it.

Every replica receives every stats message and drops those of hosts it does not own (counted as
``not_owned``); past the throughput of one controller, give each replica its own broker topic
tree per region, or use a clustered broker (see the README).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Final

from autoscaler.stats import valid_id

log = logging.getLogger(__name__)
ONLINE: Final = b"online"
OFFLINE: Final = b"offline"
OWNER_CACHE_SIZE: Final = 65_536
"""Hosts whose owner is remembered; past that the cache starts over (host ids come from the
network, so they must not grow it without bound)."""


def _weight(replica: str, host: str) -> int:
    digest = hashlib.blake2b(f"{replica}\x00{host}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Membership:
    """The live replicas of one group, and which of them owns each host."""

    def __init__(self, replica_id: str, prefix: str, *, cache_size: int = OWNER_CACHE_SIZE) -> None:
        self.replica_id = replica_id
        self.prefix = f"{prefix}/controller/"
        self.live: set[str] = {replica_id}
        self._owner: dict[str, str] = {}
        self._cache_size = cache_size
        self.changes = 0
        """Increments on every change of the live set (the controller then re-checks its guests)."""

    @property
    def topic_filter(self) -> str:
        return f"{self.prefix}+/alive"

    @property
    def presence_topic(self) -> str:
        return f"{self.prefix}{self.replica_id}/alive"

    def handles(self, topic: str) -> bool:
        return topic.startswith(self.prefix)

    def handle(self, topic: str, payload: bytes) -> None:
        replica = topic[len(self.prefix) :].removesuffix("/alive")
        if not valid_id(replica):
            return  # not a replica id: ignored rather than given a share of the hosts
        # Our own offline (a will left from a previous life) must not evict us while we run.
        online = payload == ONLINE or replica == self.replica_id
        before = set(self.live)
        if online:
            self.live.add(replica)
        else:
            self.live.discard(replica)
        if self.live != before:
            self._owner.clear()
            self.changes += 1
            log.info(
                "controller replicas changed",
                extra={"replicas": sorted(self.live), "replica": self.replica_id},
            )

    def owner(self, host: str) -> str:
        owner = self._owner.get(host)
        if owner is None:
            owner = max(self.live, key=lambda replica: _weight(replica, host))
            if len(self._owner) >= self._cache_size:
                self._owner.clear()
            self._owner[host] = owner
        return owner

    def owns(self, host: str) -> bool:
        return self.owner(host) == self.replica_id
