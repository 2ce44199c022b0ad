"""What a virtio device model is, and how one of its queues is served.

A `VirtioDevice` is the virtio framing of one device (virtio-blk, virtio-net...): its id,
feature bits, config space and a handler per queue. It never sees a transport register or
a ring layout. A `VirtQueue` joins a ring to its signals and runs the batched service pass:
take the available chains (up to a budget) in one pass, handle each, publish once,
interrupt at most once; when the ring is empty, re-enable doorbells and re-check (the vhost
loop, with vhost's weight as the budget).
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, Protocol

from alacrity.bus import QueueStats
from alacrity.virtio.chain import Chain


class Notify(str, Enum):
    """How a device and its driver signal each other (a benchmark setting)."""

    ALWAYS = "always"        # no suppression: every batch rings, every publish interrupts
    MITIGATED = "mitigated"  # the ABI's own suppression (virtio: EVENT_IDX)
    POLL = "poll"            # both sides busy-poll (bounded), notifications off meanwhile


class Ring(Protocol):
    """The device side of a ring (split now, packed later)."""

    def pop(self, limit: int = ...) -> list[Chain]: ...

    def push(self, head: int, written: int) -> None: ...

    def push_many(self, chains: list[Chain], written: list[int]) -> None: ...

    def publish(self) -> bool: ...

    def disable_notify(self) -> None: ...

    def enable_notify(self) -> bool: ...

    def has_work(self) -> bool: ...


Handler = Callable[[Chain], int]


class VirtQueue:
    """A ready queue: ring + stats + interrupt + the device's handler for its chains."""

    __slots__ = ("index", "ring", "stats", "interrupt", "suppress", "handler")

    def __init__(self, index: int, ring: Ring, stats: QueueStats,
                 interrupt: Callable[[], None], suppress: bool, handler: Handler | None):
        self.index = index
        self.ring = ring
        self.stats = stats
        self.interrupt = interrupt
        self.suppress = suppress     # mute doorbells while we are working (not in ALWAYS)
        self.handler = handler

    def _run(self, chains: list[Chain]) -> None:
        handle = self.handler
        self.ring.push_many(chains, [handle(c) for c in chains])
        stats = self.stats
        stats.requests += len(chains)
        stats.batches += 1
        self.flush()

    def flush(self) -> None:
        """Publish staged used elements and interrupt if the driver asked for it."""
        if self.ring.publish():
            self.stats.interrupts += 1
            self.interrupt()
        else:
            self.stats.interrupts_suppressed += 1

    def service(self, budget: int) -> bool:
        """One bounded pass: up to `budget` chains, one publish, at most one interrupt.
        Returns True if work remains (doorbells stay muted; the caller comes back soon).
        When it returns False, doorbells are re-enabled and the ring was re-checked."""
        if self.handler is None:
            return False
        ring = self.ring
        if self.suppress:
            ring.disable_notify()
        chains = ring.pop(budget)
        if chains:
            self._run(chains)
        if ring.has_work():
            return True
        return self.suppress and ring.enable_notify()

    def poll(self, budget: int) -> bool:
        """One polling pass (doorbells are already muted). True if it found work."""
        if self.handler is None:
            return False
        chains = self.ring.pop(budget)
        if chains:
            self._run(chains)
            return True
        return False


class VirtioDevice:
    """Base class of virtio device models (the device-type framing, no transport)."""

    device_id: int = 0
    name: str = "virtio"
    num_queues: int = 1
    queue_max: int = 256

    def __init__(self) -> None:
        self.features = 0                       # negotiated, set at FEATURES_OK
        self.on_config_change: Callable[[], None] = lambda: None

    def device_features(self) -> int:
        """Device-type feature bits offered (the transport adds the ring/version bits)."""
        return 0

    def config(self) -> bytes:
        """The device-specific config space as it reads now."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write into config space; ignored unless the device defines one."""

    def accept_features(self, features: int) -> bool:
        """Called at FEATURES_OK with the driver's features; False refuses them."""
        self.features = features
        return True

    def handler(self, index: int) -> Handler | None:
        """How chains on queue `index` are handled (None: the device drives that queue)."""
        return None

    def activate(self, queues: list[VirtQueue | None]) -> None:
        """DRIVER_OK: the queues are live."""

    def reset(self) -> None:
        self.features = 0
