"""A vhost-user frontend: our guest drivers (virtio-blk, virtio-net) driving somebody
else's backend (qemu-storage-daemon, DPDK's vhost PMD, or our own server).

- `VhostUserClient` speaks the protocol over the socket (the codec is `protocol.py`).
- `VhostUserGuest` is the "guest": RAM in memfds shared with the backend through
  SET_MEM_TABLE (frontend addresses are the guest-physical ones: userspace_addr == gpa),
  an allocator, and the device list the drivers probe.
- `VhostUserTransport` is what the drivers call a transport (the same interface as
  `MmioTransport`): feature negotiation, config space (GET_CONFIG), queues (SET_VRING_*),
  kicks (the kick eventfd) and interrupts (one call eventfd shared by all queues). There
  is no interrupt status to read or acknowledge.
"""

from __future__ import annotations

import array
import os
import socket
from typing import Any, Callable

from alacrity.bus import QueueStats
from alacrity.errors import DeviceError
from alacrity.guest.drivers.virtio_mmio import Signals, make_driver_queue
from alacrity.memory import Allocator, GuestMemory
from alacrity.virtio import spec
from alacrity.vhost_user import protocol as P
from alacrity.vhost_user.backend import recv_with_fds

GUEST_RAM_START = 1 << 20
WANTED_PROTOCOL = P.bit(P.PF.MQ) | P.bit(P.PF.REPLY_ACK) | P.bit(P.PF.CONFIG)


class VhostUserClient:
    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise DeviceError(f"vhost-user {path}: cannot connect: {e.strerror or e}") from None
        self.reader = P.Reader(reply_expected=True)
        self.protocol_features = 0

    def close(self) -> None:
        self.sock.close()

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False) -> None:
        data = P.encode(request, payload, need_reply=need_reply)
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", fds).tobytes())])
        else:
            self.sock.sendall(data)

    def recv(self, request: int) -> P.Message:
        while True:
            msgs = self.reader.feed(*recv_with_fds(self.sock))
            if msgs:
                msg = msgs[0]
                for fd in msg.fds:
                    os.close(fd)
                if msg.request != request:
                    raise DeviceError(f"vhost-user: reply to {msg.name}, expected "
                                      f"{P.Req(request).name}")
                return msg

    def call(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        """A request without a reply of its own (acknowledged if REPLY_ACK was agreed)."""
        ack = bool(self.protocol_features & P.bit(P.PF.REPLY_ACK))
        self.send(request, payload, fds, need_reply=ack)
        if ack:
            status = P.U64.unpack(self.recv(request).payload)[0]
            if status:
                raise DeviceError(f"vhost-user: {P.Req(request).name} failed ({status})")

    def get(self, request: int, payload: bytes = b"") -> bytes:
        self.send(request, payload)
        return self.recv(request).payload

    def get_u64(self, request: int) -> int:
        return P.U64.unpack(self.get(request))[0]


class VhostUserGuest:
    """A frontend-side "guest": RAM, an allocator, and the one vhost-user device. Guest
    programs run in a thread of this process (there is nothing to exit to: exits stay 0)."""

    def __init__(self, path: str, device_id: int, ram: int = 64 << 20, name: str = "vhost-user"):
        self.mem = GuestMemory.create([(0, ram)], name="alacrity-vhost-user-ram")
        self.alloc = Allocator(GUEST_RAM_START, ram)
        self.devices = [{"kind": "vhost-user", "name": name, "path": path, "device_id": device_id}]
        self.exits = 0
        self.extra_fds: list[int] = []
        self.transports: list[VhostUserTransport] = []
        self.on_mark: Callable[[str, dict[str, Any]], None] = lambda name, data: None

    def mark(self, name: str, **data: Any) -> None:
        self.on_mark(name, data)

    def signals(self) -> dict[str, int]:
        """Doorbells (kicks written) and interrupts (call-fd wake-ups), as the frontend
        counts them: the backend is somebody else's."""
        return {"doorbells": sum(s.doorbells for t in self.transports for s in t.stats.values()),
                "doorbells_suppressed": sum(s.doorbells_suppressed for t in self.transports
                                            for s in t.stats.values()),
                "interrupts": sum(t.interrupts for t in self.transports)}

    def close(self) -> None:
        for t in self.transports:
            t.close()
        self.transports.clear()
        self.mem.close()


class VhostUserTransport(Signals):
    """The driver-facing transport over a vhost-user connection."""

    def __init__(self, machine: VhostUserGuest, device: dict[str, Any]):
        self.m = machine
        self.path = device["path"]
        self.name = f"vhost-user:{self.path}"
        self.device_id = device["device_id"]
        self.c = VhostUserClient(self.path)
        machine.transports.append(self)
        self.closed = False
        self.features = 0
        self.offered = 0
        self.queues: dict[int, Any] = {}
        self.stats: dict[int, QueueStats] = {}
        self.kick_fds: dict[int, int] = {}
        self.irq_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.interrupts = 0
        self.acks = 0
        self.num_queues = 0
        self._config: bytes | None = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.c.close()
        for fd in self.kick_fds.values():
            os.close(fd)
        self.kick_fds.clear()
        os.close(self.irq_fd)

    # -- initialisation ----------------------------------------------------------------------
    def negotiate(self, wanted: int) -> int:
        c = self.c
        c.send(P.Req.SET_OWNER)
        self.offered = c.get_u64(P.Req.GET_FEATURES)
        if self.offered & P.bit(P.F_PROTOCOL_FEATURES):
            pf = c.get_u64(P.Req.GET_PROTOCOL_FEATURES) & WANTED_PROTOCOL
            c.send(P.Req.SET_PROTOCOL_FEATURES, P.U64.pack(pf))
            c.protocol_features = pf
        if not self.offered & spec.bit(spec.F_VERSION_1):
            raise DeviceError(f"{self.name}: the backend does not offer VIRTIO_F_VERSION_1")
        feats = (wanted & self.offered) | spec.bit(spec.F_VERSION_1)
        wire = feats | (self.offered & P.bit(P.F_PROTOCOL_FEATURES))
        c.call(P.Req.SET_FEATURES, P.U64.pack(wire))
        self.features = feats
        self.num_queues = (c.get_u64(P.Req.GET_QUEUE_NUM)
                           if c.protocol_features & P.bit(P.PF.MQ) else 0)
        regions = self.m.mem.regions
        table = P.MEM_HDR.pack(len(regions), 0) + b"".join(
            P.MEM_REGION.pack(r.gpa, r.size, r.gpa, r.fd_offset) for r in regions)
        c.call(P.Req.SET_MEM_TABLE, table, [r.fd for r in regions])
        return feats

    def has(self, feature_bit: int) -> bool:
        return bool(self.features & spec.bit(feature_bit))

    def read_config(self, offset: int, size: int) -> int:
        """A config field (GET_CONFIG); zero if the backend has no config space for us."""
        if self._config is None:
            self._config = b""
            if self.c.protocol_features & P.bit(P.PF.CONFIG):
                n = 60 if self.device_id == spec.ID_BLOCK else 12
                reply = self.c.get(P.Req.GET_CONFIG, P.CONFIG_HDR.pack(0, n, 0) + bytes(n))
                off, got, _ = P.CONFIG_HDR.unpack_from(reply)
                self._config = reply[P.CONFIG_HDR.size:P.CONFIG_HDR.size + got]
        return int.from_bytes(self._config[offset:offset + size].ljust(size, b"\0"), "little")

    def setup_queue(self, qi: int, size: int, *, indirect_max: int = 0) -> Any:
        if self.num_queues and qi >= self.num_queues:
            raise DeviceError(f"{self.name}: queue {qi} does not exist ({self.num_queues})")
        q = make_driver_queue(self.m, size, self.features, indirect_max)
        self.kick_fds[qi] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._send_ring(qi, q, 1 << 15 if self.has(spec.F_RING_PACKED) else 0)
        self.queues[qi] = q
        self.stats[qi] = QueueStats()
        return q

    def _send_ring(self, qi: int, q: Any, base: int) -> None:
        desc, avail, used = q.addrs
        c = self.c
        c.call(P.Req.SET_VRING_NUM, P.VRING_STATE.pack(qi, q.size))
        c.call(P.Req.SET_VRING_BASE, P.VRING_STATE.pack(qi, base))
        c.call(P.Req.SET_VRING_ADDR, P.VRING_ADDR.pack(qi, 0, desc, used, avail, 0))
        c.call(P.Req.SET_VRING_CALL, P.U64.pack(qi), [self.irq_fd])
        c.call(P.Req.SET_VRING_KICK, P.U64.pack(qi), [self.kick_fds[qi]])
        if self.offered & P.bit(P.F_PROTOCOL_FEATURES):
            c.call(P.Req.SET_VRING_ENABLE, P.VRING_STATE.pack(qi, 1))

    def reconnect(self, bases: dict[int, int]) -> None:
        """Connect again (the backend restarted, or we went away) and resume every ring
        where `bases` says (what GET_VRING_BASE returned), as QEMU does on reconnect."""
        self.c.close()
        self.c = VhostUserClient(self.path)
        if self.negotiate(self.features) != self.features:
            raise DeviceError(f"{self.name}: the backend no longer offers {self.features:#x}")
        for qi, q in self.queues.items():
            self._send_ring(qi, q, bases[qi])

    def driver_ok(self) -> None:
        """Nothing to say: rings run once kicked and enabled."""

    def stop_queue(self, qi: int) -> int:
        """GET_VRING_BASE: the backend stops the ring and tells where it is."""
        reply = self.c.get(P.Req.GET_VRING_BASE, P.VRING_STATE.pack(qi, 0))
        return P.VRING_STATE.unpack(reply)[1]

    def fail(self) -> None:
        pass

    def device_status(self) -> int:
        return 0

    # -- signals (kick and wait_interrupt: Signals) ---------------------------------------------
    def notify(self, qi: int) -> None:
        os.eventfd_write(self.kick_fds[qi], 1)

    def ack_interrupt(self) -> int:
        """vhost-user has no interrupt status: nothing to read or acknowledge."""
        return 0
