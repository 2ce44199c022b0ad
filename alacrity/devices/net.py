"""The network device core and its backends. No ring code here: virtio-net and venet frame
packets their own way and share `NetCore`.

A backend moves Ethernet frames between the core and the outside:
- `loopback`: every transmitted frame comes back to the same core;
- `pair`: two cores joined by a virtual wire;
- `tap:NAME`: a Linux tap device (/dev/net/tun, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).

Frames arriving for the guest wait in a bounded backlog until the transport has buffers.
Virtual wires (loopback, pair) push back: a sender takes no more frames than the receiving
backlog has room for, and is woken when it drains, as vhost-net waits on a full socket. A
tap device cannot push back: beyond the backlog, frames are dropped and counted.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import struct
from typing import Any, Callable

from alacrity.errors import ConfigError

log = logging.getLogger("alacrity.net")

ETH_HLEN = 14
ETH_MIN = 14                 # a header and nothing else is still a frame
DEFAULT_MTU = 1500
VNET_HDR_LEN = 12            # struct virtio_net_hdr with num_buffers (VERSION_1)

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


class NetCounters:
    __slots__ = ("tx_frames", "tx_bytes", "tx_dropped", "rx_frames", "rx_bytes", "rx_dropped",
                 "rx_too_big", "rx_no_room", "tx_malformed")

    def __init__(self) -> None:
        for k in self.__slots__:
            setattr(self, k, 0)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class NetCore:
    """A NIC without a transport: MAC, MTU, link state, counters and the rx backlog."""

    def __init__(self, backend: "NetBackend", mac: bytes | None = None, mtu: int = DEFAULT_MTU,
                 backlog: int = 1024):
        self.backend = backend
        self.mac = mac or bytes([0x52, 0x54, 0x00, 0xA1, 0xAC, 0x01 + backend.index])
        self.mtu = mtu
        self.max_frame = ETH_HLEN + mtu
        self.link_up = True
        self.counters = NetCounters()
        self.backlog: collections.deque[bytes] = collections.deque()
        self.backlog_max = backlog
        self.on_rx: Callable[[], None] = lambda: None   # the transport: "frames are waiting"
        self._sending = False       # inside transmit(): frames received now came back to us
        self._looped = False
        self._room_waiters: list[Callable[[], None]] = []
        backend.attach(self)


    def transmit(self, frames: list[bytes]) -> bool:
        """Frames from the guest, already stripped of any transport header. Returns True if
        frames came straight back to this core while sending (loopback): they wait in the
        backlog and the transport was not told (on_rx), so it places them in the same pass
        instead of scheduling another."""
        c = self.counters
        limit = self.max_frame
        total = 0
        for f in frames:                  # one pass; a bad frame sends us to the slow path
            n = len(f)
            if n < ETH_MIN or n > limit:
                good = [f for f in frames if ETH_MIN <= len(f) <= limit]
                c.tx_dropped += len(frames) - len(good)
                total = sum(map(len, good))
                break
            total += n
        else:
            good = frames
        c.tx_bytes += total
        c.tx_frames += len(good)
        if good:
            self._sending = True
            try:
                self.backend.send(good)
            finally:
                self._sending = False
        looped, self._looped = self._looped, False
        return looped

    def room(self) -> int:
        """How many frames the other end can take now (backpressure for virtual wires)."""
        return self.backend.room()

    def backlog_room(self) -> int:
        return self.backlog_max - len(self.backlog)

    def wait_room(self, callback: Callable[[], None]) -> None:
        """Call `callback` once this core's backlog has drained (a sender is blocked on us)."""
        self._room_waiters.append(callback)

    def drained(self) -> None:
        """The transport took frames out of the backlog: wake blocked senders."""
        if self._room_waiters and len(self.backlog) <= self.backlog_max // 2:
            waiters, self._room_waiters = self._room_waiters, []
            for cb in waiters:
                cb()

    def receive(self, frames: list[bytes]) -> None:
        """Frames for the guest (from the backend). Queued, then the transport is told."""
        limit = self.max_frame + 4          # room for one VLAN tag
        for f in frames:
            if len(f) > limit:
                c = self.counters
                c.rx_too_big += sum(1 for f in frames if len(f) > limit)
                frames = [f for f in frames if len(f) <= limit]
                break
        backlog = self.backlog
        room = self.backlog_max - len(backlog)
        if len(frames) > room:
            self.counters.rx_dropped += len(frames) - max(room, 0)
            frames = frames[:max(room, 0)]
        if frames:
            backlog.extend(frames)
            if self._sending:
                self._looped = True         # transmit() tells its caller
            else:
                self.on_rx()


class NetBackend:
    kind = "backend"
    index = 0
    receiver: "NetCore | None" = None   # a virtual wire: the core our frames land in

    def attach(self, core: NetCore) -> None:
        self.core = core

    def send(self, frames: list[bytes]) -> None:
        raise NotImplementedError

    def room(self) -> int:
        """Frames the receiving side can take now; a wire that drops reports plenty."""
        return 1 << 30

    def wait_room(self, callback: Callable[[], None]) -> None:
        """Call `callback` when room() may have grown."""
        callback()

    def start(self, io: Any) -> None:
        """Called once the machine's I/O thread exists (backends with fds register here)."""

    def close(self) -> None:
        pass


class LoopbackBackend(NetBackend):
    """Every transmitted frame comes back on receive.

    By default a sender waits while the receive backlog is full (the benches measure the
    rings, not a loss rate). `lossy=True` behaves like a NIC in loopback instead: frames the
    guest has no room for are dropped and counted, so a guest that never receives (DPDK's
    txonly) can still transmit."""

    kind = "loopback"

    def __init__(self, *, lossy: bool = False):
        self.lossy = lossy

    def attach(self, core: NetCore) -> None:
        self.core = self.receiver = core

    def send(self, frames: list[bytes]) -> None:
        self.core.receive(frames)

    def room(self) -> int:
        return 1 << 30 if self.lossy else self.core.backlog_room()

    def wait_room(self, callback: Callable[[], None]) -> None:
        self.core.wait_room(callback)


class PairEnd(NetBackend):
    """One end of a virtual wire; what one end sends, the other receives."""

    kind = "pair"

    def __init__(self, index: int):
        self.index = index
        self.peer: PairEnd | None = None
        self.core: NetCore | None = None

    def send(self, frames: list[bytes]) -> None:
        if self.peer is not None and self.peer.core is not None:
            self.peer.core.receive(frames)

    def room(self) -> int:
        peer = self.peer.core if self.peer is not None else None
        return peer.backlog_room() if peer is not None else 1 << 30

    def wait_room(self, callback: Callable[[], None]) -> None:
        peer = self.peer.core if self.peer is not None else None
        if peer is not None:
            peer.wait_room(callback)
        else:
            callback()


    def attach(self, core: NetCore) -> None:
        self.core = core
        if self.peer is not None:
            self.peer.receiver = core


def pair() -> tuple[PairEnd, PairEnd]:
    a, b = PairEnd(0), PairEnd(1)
    a.peer, b.peer = b, a
    return a, b


class TapBackend(NetBackend):
    """A Linux tap device. Frames carry a 12-byte virtio_net_hdr on the fd (IFF_VNET_HDR);
    no offloads are enabled, so the header is zero except what we fill in."""

    kind = "tap"

    def __init__(self, name: str, *, read_batch: int = 64):
        if not name or len(name) > 15 or "/" in name:
            raise ConfigError(f"tap:{name}: not a valid interface name")
        if not os.path.exists(f"/sys/class/net/{name}"):
            raise ConfigError(f"tap:{name}: no such network device (create it first, e.g. "
                              f"ip tuntap add dev {name} mode tap)")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"tap:{name}: cannot open /dev/net/tun: {e.strerror}") from None
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(),
                                                   IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        except OSError as e:
            os.close(fd)
            why = {errno.EBUSY: "busy (another process has it open)",
                   errno.EPERM: "permission denied (needs CAP_NET_ADMIN)",
                   errno.EINVAL: "not a tap device, or its flags do not match"}.get(e.errno, e.strerror)
            raise ConfigError(f"tap:{name}: {why}") from None
        self.name = name
        self.fd = fd
        self.read_batch = read_batch
        self._zero_hdr = bytes(VNET_HDR_LEN)
        self.io: Any = None

    def start(self, io: Any) -> None:
        self.io = io
        io.add_reader(self.fd, self._readable)

    def send(self, frames: list[bytes]) -> None:
        hdr = self._zero_hdr
        for f in frames:
            try:
                os.writev(self.fd, [hdr, f])
            except BlockingIOError:
                self.core.counters.tx_dropped += 1
            except OSError as e:
                self.core.counters.tx_dropped += 1
                log.warning("tap:%s: write failed: %s", self.name, e)

    def _readable(self) -> None:
        frames = []
        for _ in range(self.read_batch):
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError as e:
                log.warning("tap:%s: read failed: %s", self.name, e)
                break
            if len(data) > VNET_HDR_LEN:
                frames.append(data[VNET_HDR_LEN:])
        if frames:
            self.core.receive(frames)

    def close(self) -> None:
        if self.fd >= 0:
            if self.io is not None:
                self.io.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


def open_backends(spec: str, count: int = 1) -> list[NetBackend]:
    """`loopback`, `pair` (two ends) or `tap:NAME`."""
    if spec == "loopback":
        return [LoopbackBackend() for _ in range(count)]
    if spec == "pair":
        return list(pair())
    if spec.startswith("tap:"):
        return [TapBackend(spec[4:])]
    raise ConfigError(f"--backend {spec}: expected loopback, pair or tap:NAME")
