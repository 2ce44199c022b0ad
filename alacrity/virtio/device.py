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
from alacrity.limits import Limits
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

    __slots__ = ("index", "ring", "stats", "interrupt", "suppress", "handler", "after", "kick",
                 "budget", "limit", "poll_hook", "copier")

    def __init__(self, index: int, ring: Ring, stats: QueueStats,
                 interrupt: Callable[[], None], suppress: bool, handler: Handler | None,
                 after: Callable[[], None] | None = None, kick: Callable[[], bool] | None = None,
                 budget: int = 8, limit: Callable[[], int] | None = None,
                 poll_hook: Callable[[], bool] | None = None,
                 copier: tuple[int, int, Callable[[list[bytes]], None]] | None = None):
        self.index = index
        self.ring = ring
        self.stats = stats
        self.interrupt = interrupt
        self.suppress = suppress     # mute doorbells while we are working (not in ALWAYS)
        self.handler = handler       # chain -> bytes written, for request/response queues
        self.after = after           # run after each batch of chains (e.g. send what tx took)
        self.kick = kick             # for queues the device drives itself (e.g. net rx)
        self.budget = budget         # chains per pass before other work gets a turn
        self.limit = limit           # chains the device can take now (backpressure), if any
        self.poll_hook = poll_hook or kick   # a device-driven queue's busy-poll pass
        # (skip, longest, consume): requests that are one readable buffer of at most
        # `longest` bytes are copied out by the ring (`take_copies`) and handed over as
        # bytes, without Chain objects; others go to the handler as usual. Only for rings
        # that have the fast path.
        self.copier = copier if hasattr(ring, "take_copies") else None

    def _pass(self, budget: int) -> bool:
        """Take up to `budget` requests, complete them with one publish. True if any."""
        ring = self.ring
        n = 0
        heads = chains = None
        if self.copier is not None:
            skip, longest, consume = self.copier
            heads, copies = ring.take_copies(budget, skip, longest)
            if heads:
                consume(copies)
                n = len(heads)
                budget -= n
        if budget > 0 and ring.has_work():
            chains = ring.pop(budget)
            if chains:
                handle = self.handler
                written = [handle(c) for c in chains]
                n += len(chains)
        if not n:
            return False
        if self.after is not None:
            # first what the batch is for (net tx: send the frames; a loopback or pair peer
            # gets them at once), then its completions: the peer's frame does not wait for
            # our used-ring writes
            self.after()
        if heads:
            ring.push_heads(heads)
        if chains:
            ring.push_many(chains, written)
        self.complete(n)
        return True

    def complete(self, n: int) -> None:
        """Account for n used elements pushed, publish them (one batch) and interrupt if the
        driver asked for it."""
        published = self.ring.publish()        # first: the driver may be waiting for it
        stats = self.stats
        stats.requests += n
        stats.batches += 1
        if published:
            stats.interrupts += 1
            self.interrupt()
        else:
            stats.interrupts_suppressed += 1

    def service(self) -> bool:
        """One bounded pass: up to `budget` chains, one publish, at most one interrupt.
        Returns True if work remains (doorbells stay muted; the caller comes back soon).
        When it returns False, doorbells are re-enabled and the ring was re-checked."""
        if self.handler is None:
            return self.kick() if self.kick is not None else False
        ring = self.ring
        if self.suppress:
            ring.disable_notify()
        budget = self.budget if self.limit is None else min(self.budget, self.limit())
        if budget <= 0:
            return False     # blocked: the device comes back when it can take more
        self._pass(budget)
        if ring.has_work():
            return True
        return self.suppress and ring.enable_notify()

    def poll(self) -> bool:
        """One polling pass (doorbells are already muted). True if it found work. This runs
        on every turn of a busy-poll loop, so the nothing-to-do case is kept short."""
        if self.handler is None:
            return self.poll_hook() if self.poll_hook is not None else False
        ring = self.ring
        if not ring.has_work():
            return False
        budget = self.budget if self.limit is None else min(self.budget, self.limit())
        return budget > 0 and self._pass(budget)


class VirtioDevice:
    """Base class of virtio device models (the device-type framing, no transport)."""

    device_id: int = 0
    name: str = "virtio"
    num_queues: int = 1
    queue_max: int = 256

    def __init__(self) -> None:
        self.features = 0                       # negotiated, set at FEATURES_OK
        self.on_config_change: Callable[[], None] = lambda: None
        # set by the transport: run fn() soon on the I/O thread, under the device lock, while
        # the device is live; fn returns True to be run again (more work)
        self.schedule: Callable[[Callable[[], bool]], None] = lambda fn: None

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

    def after(self, index: int) -> Callable[[], None] | None:
        """Something to run after each batch of chains on queue `index`, if any."""
        return None

    def kick(self, index: int) -> bool:
        """A doorbell (or a polling pass) on a queue the device drives; True: more work."""
        return False

    def budget(self, index: int) -> int | None:
        """Chains per pass on queue `index`, if the device knows better than the transport."""
        return None

    def limit(self, index: int) -> Callable[[], int] | None:
        """How many chains queue `index` may take right now (backpressure), if it can block."""
        return None

    def copier(self, index: int) -> tuple[int, int, Callable[[list[bytes]], None]] | None:
        """For a queue whose requests are each one device-readable buffer the device only
        copies (net tx): (bytes to skip, the longest buffer to copy, a function taking the
        copies in order). Requests of any other shape or size still go to handler()."""
        return None

    def poller(self, index: int) -> Callable[[], bool] | None:
        """A cheap busy-poll pass for a queue the device drives (default: its kick)."""
        return None

    def apply_limits(self, limits: Limits) -> None:
        """The user's limits (the rings enforce them); a device whose config space tells
        the driver its own limits (virtio-blk seg_max, size_max) lowers them to fit."""

    def activate(self, queues: list[VirtQueue | None]) -> None:
        """DRIVER_OK: the queues are live."""

    def reset(self) -> None:
        self.features = 0
