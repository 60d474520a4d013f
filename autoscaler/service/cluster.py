"""Scale-out: several controller replicas split one fleet by host, without two steering a guest.

Each replica with a ``controller.replica_id`` announces itself with a retained presence on
``{prefix}/controller/{replica_id}/alive``: ``{"state": "online", "ts": <Unix s>, "ttl_s": <s>}``,
published on every connect and refreshed every third of its ``ttl_s``
(``controller.presence_ttl_s``). Its MQTT will (and a clean shutdown) replaces that with
``offline``. Every replica follows those topics and assigns each host to one live replica by
rendezvous (highest-random-weight) hashing of (replica, host): all replicas compute the same
owner from the same live set, and when a replica joins or leaves only the hosts it gains or
loses move.

Liveness. A replica counts as live until ``ttl_s`` after its presence was last *received* (the
receiver's clock: replicas' clocks need not agree). A presence that is not an online one with a
time and a TTL (``offline``, an ``online`` of an older version, anything else) counts as expired
at once. So a retained ghost (a replica whose will never fired, a presence copied by hand) holds
its hosts for at most its TTL, then the live replicas take them over.

Failure behaviour: when a replica dies, the broker publishes its will once the keepalive
(``mqtt.keepalive_s``) runs out, or its presence expires, whichever comes first; the other
replicas then take over its hosts and start steering them from fresh samples (rates need two).
Until then those guests keep their last target, which is safe: a balloon that is not moved
neither starves nor frees anything. While the live set changes, two replicas may briefly
disagree about one host and both send it a target; targets are absolute, so the next tick of
the rightful owner settles it.

Every replica receives every stats message and drops those of hosts it does not own (counted as
``not_owned``); past the throughput of one controller, give each replica its own broker topic
tree per region, or use a clustered broker (see the README).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Final

from autoscaler.wire import PayloadError, TopicKind, Topics, decode_presence, encode_presence

log = logging.getLogger(__name__)
PRESENCE_REFRESHES_PER_TTL: Final = 3
"""A replica refreshes its presence this many times per TTL, so one lost or late refresh does
not make it look dead."""
OWNER_CACHE_SIZE: Final = 65_536
"""Hosts whose owner is remembered; past that the cache starts over (host ids come from the
network, so they must not grow it without bound)."""


def _weight(replica: str, host: str) -> int:
    digest = hashlib.blake2b(f"{replica}\x00{host}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Membership:
    """The live replicas of one group, and which of them owns each host."""

    def __init__(
        self,
        replica_id: str,
        prefix: str,
        *,
        ttl_s: float = 30.0,
        cache_size: int = OWNER_CACHE_SIZE,
    ) -> None:
        self.replica_id = replica_id
        self.topics = Topics(prefix)
        self.ttl_s = ttl_s
        self.live: set[str] = {replica_id}
        self._expires_s: dict[str, float] = {}
        """Other live replicas → when their presence expires (``time.monotonic()``)."""
        self._owner: dict[str, str] = {}
        self._cache_size = cache_size
        self.changes = 0
        """Increments on every change of the live set (the controller then re-checks its guests)."""

    @property
    def topic_filter(self) -> str:
        return self.topics.presence_filter()

    @property
    def presence_topic(self) -> str:
        return self.topics.presence(self.replica_id)

    @property
    def refresh_interval_s(self) -> float:
        return self.ttl_s / PRESENCE_REFRESHES_PER_TTL

    def online_payload(self) -> bytes:
        return encode_presence(time.time(), self.ttl_s)

    def handle(self, topic: str, payload: bytes, *, now_s: float | None = None) -> None:
        """A presence received at monotonic time ``now_s`` (now if None)."""
        # Not a replica's presence topic: ignored rather than given a share of the hosts. Our own
        # presence (or an offline will left from a previous life) must not evict us while we run.
        try:
            kind, replica, _ = self.topics.parse(topic)
        except PayloadError:
            return
        if kind is not TopicKind.PRESENCE or replica == self.replica_id:
            return
        try:
            ttl_s = decode_presence(payload).ttl_s
        except PayloadError:  # offline, or not a presence this version believes
            self._expires_s.pop(replica, None)
        else:
            received_s = time.monotonic() if now_s is None else now_s
            self._expires_s[replica] = received_s + ttl_s
        self._update()

    def expire(self, now_s: float | None = None) -> None:
        """Drop the replicas whose presence was not refreshed within its TTL."""
        now_s = time.monotonic() if now_s is None else now_s
        expired = [r for r, expires_s in self._expires_s.items() if expires_s <= now_s]
        for replica in expired:
            del self._expires_s[replica]
        if expired:
            log.warning("controller replicas expired: no presence within their TTL: %s", expired)
            self._update()

    def _update(self) -> None:
        live = {self.replica_id, *self._expires_s}
        if live != self.live:
            self.live = live
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
