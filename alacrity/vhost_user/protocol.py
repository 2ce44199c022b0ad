"""The vhost-user protocol (QEMU docs/interop/vhost-user.rst), sans I/O.

No sockets here: a `Reader` turns received bytes and file descriptors into `Message`s, the
`encode` helpers turn requests and replies into bytes, and `BackendSession` is the
backend's state machine: it takes one `Message` at a time, checks it completely, keeps the
protocol state (features, owner, memory table, per-ring configuration) and returns the
`Event`s a backend must act on, including the bytes to send back. A message that breaks the
protocol raises `ProtocolError` (the backend logs it and ends the connection).

Wire format: a 12-byte header {u32 request, u32 flags, u32 size} then `size` bytes of
payload; file descriptors travel as SCM_RIGHTS with the message. flags: version 1 in bits
0-1, REPLY (bit 2), NEED_REPLY (bit 3).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

VERSION = 1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
HEADER = struct.Struct("<III")
MAX_PAYLOAD = 4096
MAX_FDS = 8
MAX_REGIONS = 8                 # VHOST_MEMORY_BASELINE_NREGIONS
MAX_CONFIG = 256
CONFIG_OFFSET_MAX = 256

F_LOG_ALL = 26                  # VHOST_F_LOG_ALL (not offered)
F_PROTOCOL_FEATURES = 30        # VHOST_USER_F_PROTOCOL_FEATURES


class Req(IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class PF(IntEnum):
    """Protocol feature bits."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


def bit(n: int) -> int:
    return 1 << n


U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")          # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")       # index, flags, desc, used, avail, log (user addrs)
MEM_HDR = struct.Struct("<II")              # nregions, padding
MEM_REGION = struct.Struct("<QQQQ")         # guest_phys_addr, memory_size, userspace_addr, mmap_offset
CONFIG_HDR = struct.Struct("<III")          # offset, size, flags
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8
VRING_F_LOG = 1                             # SET_VRING_ADDR flags: log the used ring


class ProtocolError(Exception):
    """The peer broke the protocol: end the connection."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        try:
            return Req(self.request).name
        except ValueError:
            return f"request {self.request}"


def encode(request: int, payload: bytes = b"", *, reply: bool = False,
           need_reply: bool = False) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes")
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


class Reader:
    """Stream framing: feed() what recvmsg returned; get whole messages back.

    File descriptors belong to the message that was being received when the data they came
    with ended: a unix stream socket delivers a sendmsg's SCM_RIGHTS with the last bytes of
    a receive (it stops reading after a segment that carries fds), and a sender sends each
    message with one sendmsg. So several fd-less messages may precede, in one receive, the
    message the fds belong to."""

    def __init__(self, *, reply_expected: bool = False):
        self.buf = bytearray()
        self.start = 0                            # stream offset of buf[0]
        self.fds: list[tuple[int, int]] = []      # (stream offset where they arrived, fd)
        self.reply_expected = reply_expected

    def feed(self, data: bytes, fds: list[int] | None = None) -> list[Message]:
        self.buf += data
        if fds:
            end = self.start + len(self.buf)
            self.fds.extend((end, fd) for fd in fds)
            if len(self.fds) > MAX_FDS:
                raise ProtocolError(f"{len(self.fds)} file descriptors with one message "
                                    f"(at most {MAX_FDS})")
        out = []
        while len(self.buf) >= HEADER.size:
            request, flags, size = HEADER.unpack_from(self.buf)
            if flags & FLAG_VERSION_MASK != VERSION:
                raise ProtocolError(f"message version {flags & FLAG_VERSION_MASK} (speak {VERSION})")
            if size > MAX_PAYLOAD:
                raise ProtocolError(f"{Message(request, flags, b'').name}: payload size {size} "
                                    f"(at most {MAX_PAYLOAD})")
            if bool(flags & FLAG_REPLY) != self.reply_expected:
                raise ProtocolError(f"{Message(request, flags, b'').name}: reply flag "
                                    f"{'set' if flags & FLAG_REPLY else 'clear'} unexpectedly")
            n = HEADER.size + size
            if len(self.buf) < n:
                break
            payload = bytes(self.buf[HEADER.size:n])
            del self.buf[:n]
            end = self.start + n
            mine = [fd for at, fd in self.fds if at <= end]
            self.fds = [(at, fd) for at, fd in self.fds if at > end]
            self.start = end
            out.append(Message(request, flags, payload, mine))
        return out

    def eof(self) -> None:
        """The peer closed: a partial message is a truncated one."""
        if self.buf:
            raise ProtocolError(f"connection closed in the middle of a message "
                                f"({len(self.buf)} bytes of it)")

    def close_fds(self) -> None:
        import os
        for _, fd in self.fds:
            os.close(fd)
        self.fds = []


# -------------------------------------------------------------------------------------------
# events: what a backend must do
# -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    gpa: int
    size: int
    uaddr: int
    offset: int
    fd: int


@dataclass
class Send:
    """Bytes to send to the frontend (a reply)."""
    data: bytes


@dataclass
class SetFeatures:
    features: int


@dataclass
class SetMemTable:
    regions: list[Region]           # the fds are the backend's to close


@dataclass
class RingFd:
    kind: str                       # "kick", "call" or "err"
    index: int
    fd: int | None                  # None: no fd (VRING_NOFD): poll, or do not signal


@dataclass
class RingStart:
    """Ring `index` is configured, kicked and enabled: serve it. Addresses are guest
    physical (translated through the memory table); `base` as SET_VRING_BASE said."""
    index: int
    num: int
    desc: int
    driver: int
    device: int
    base: int
    features: int


@dataclass
class RingStop:
    """GET_VRING_BASE: stop ring `index` and reply with `session.vring_base(index, base)`."""
    index: int


@dataclass
class RingPause:
    """SET_VRING_ENABLE 0 on a started ring: stop serving it, keep its position."""
    index: int


@dataclass
class GetConfig:
    offset: int
    size: int
    flags: int


@dataclass
class SetConfig:
    offset: int
    flags: int
    data: bytes


@dataclass
class ResetOwner:
    """Forget everything: stop every ring, unmap memory."""


@dataclass
class Ack:
    """The frontend asked for a reply (REPLY_ACK): send `session.ack(request, ok)`."""
    request: int


Event = Send | SetFeatures | SetMemTable | RingFd | RingStart | RingStop | RingPause | \
    GetConfig | SetConfig | ResetOwner | Ack


@dataclass
class _Ring:
    num: int = 0
    addr: tuple[int, int, int] | None = None    # desc, used, avail (user addresses)
    base: int = 0
    kicked: bool = False
    enabled: bool = False
    started: bool = False


class BackendSession:
    """A backend's side of one connection."""

    def __init__(self, *, features: int, protocol_features: int, num_queues: int,
                 queue_max: int):
        self.offered = features | bit(F_PROTOCOL_FEATURES)
        self.offered_protocol = protocol_features
        self.num_queues = num_queues
        self.queue_max = queue_max
        self.features = 0
        self.protocol_features = 0
        self.features_set = False
        self.owner = False
        self.regions: list[Region] = []
        self.rings = [_Ring() for _ in range(num_queues)]

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def _size(msg: Message, want: int) -> None:
        if len(msg.payload) != want:
            raise ProtocolError(f"{msg.name}: payload of {len(msg.payload)} bytes "
                                f"(expected {want})")

    @staticmethod
    def _no_fds(msg: Message) -> None:
        if msg.fds:
            raise ProtocolError(f"{msg.name}: {len(msg.fds)} unexpected file descriptors")

    def _offered_bits(self, msg: Message, offered: int) -> int:
        """A u64 of feature bits, every one of them offered."""
        self._size(msg, 8)
        f = U64.unpack(msg.payload)[0]
        if f & ~offered:
            raise ProtocolError(f"{msg.name} {f:#x}: bits {f & ~offered:#x} were not offered")
        return f

    def _ring(self, msg: Message, index: int) -> _Ring:
        if index >= self.num_queues:
            raise ProtocolError(f"{msg.name}: ring {index} out of range "
                                f"(the device has {self.num_queues})")
        return self.rings[index]

    def reply(self, request: int, payload: bytes) -> bytes:
        return encode(request, payload, reply=True)

    def ack(self, request: int, ok: bool) -> bytes:
        return self.reply(request, U64.pack(0 if ok else 1))

    def vring_base(self, index: int, base: int) -> bytes:
        return self.reply(Req.GET_VRING_BASE, VRING_STATE.pack(index, base))

    def config_reply(self, offset: int, flags: int, data: bytes) -> bytes:
        return self.reply(Req.GET_CONFIG, CONFIG_HDR.pack(offset, len(data), flags) + data)

    def translate(self, uaddr: int, length: int) -> int:
        """A frontend virtual address range -> guest physical, through the memory table."""
        for r in self.regions:
            if r.uaddr <= uaddr and uaddr + length <= r.uaddr + r.size:
                return r.gpa + (uaddr - r.uaddr)
        raise ProtocolError(f"ring address {uaddr:#x}+{length:#x} is in no memory region")

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & bit(PF.REPLY_ACK))

    # -- one message -----------------------------------------------------------------------
    def receive(self, msg: Message) -> list[Event]:
        try:
            events = self._dispatch(msg)
        except ProtocolError:
            raise
        except (struct.error, ValueError) as e:
            raise ProtocolError(f"{msg.name}: {e}") from None
        if msg.need_reply and self.reply_ack and not any(isinstance(e, Send) for e in events) \
                and not any(isinstance(e, (RingStop, GetConfig)) for e in events):
            events.append(Ack(msg.request))
        return events

    # requests that configure the device: only its owner may send them
    OWNED = frozenset({Req.SET_FEATURES, Req.SET_MEM_TABLE, Req.SET_VRING_NUM,
                       Req.SET_VRING_ADDR, Req.SET_VRING_BASE, Req.GET_VRING_BASE,
                       Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR,
                       Req.SET_VRING_ENABLE, Req.SET_CONFIG})

    def _dispatch(self, msg: Message) -> list[Event]:
        r = msg.request
        p = msg.payload
        if r in self.OWNED and not self.owner:
            raise ProtocolError(f"{msg.name} before SET_OWNER")
        if r in (Req.SET_LOG_BASE, Req.SET_LOG_FD):
            raise ProtocolError(f"{msg.name}: dirty logging is not supported (LOG_SHMFD and "
                                f"VHOST_F_LOG_ALL were not offered)")
        if r != Req.SET_MEM_TABLE and r not in (Req.SET_VRING_KICK, Req.SET_VRING_CALL,
                                                Req.SET_VRING_ERR):
            self._no_fds(msg)
        if r == Req.GET_FEATURES:
            self._size(msg, 0)
            return [Send(self.reply(r, U64.pack(self.offered)))]
        if r == Req.SET_FEATURES:
            f = self._offered_bits(msg, self.offered)
            self.features = f
            self.features_set = True
            if not f & bit(F_PROTOCOL_FEATURES):
                # without protocol features, rings are enabled as soon as they start
                for ring in self.rings:
                    ring.enabled = True
            return [SetFeatures(f)] + self._maybe_start_all()
        if r == Req.SET_OWNER:
            self._size(msg, 0)
            self.owner = True
            return []
        if r == Req.RESET_OWNER:
            self._size(msg, 0)
            self.owner = False
            self.features = 0
            self.features_set = False
            self.regions = []
            self.rings = [_Ring() for _ in range(self.num_queues)]
            return [ResetOwner()]
        if r == Req.GET_PROTOCOL_FEATURES:
            self._size(msg, 0)
            return [Send(self.reply(r, U64.pack(self.offered_protocol)))]
        if r == Req.SET_PROTOCOL_FEATURES:
            self.protocol_features = self._offered_bits(msg, self.offered_protocol)
            return []
        if r == Req.GET_QUEUE_NUM:
            self._size(msg, 0)
            return [Send(self.reply(r, U64.pack(self.num_queues)))]
        if r == Req.SET_MEM_TABLE:
            return [self._mem_table(msg)]
        if r == Req.SET_VRING_NUM:
            self._size(msg, VRING_STATE.size)
            index, num = VRING_STATE.unpack(p)
            ring = self._ring(msg, index)
            if ring.started:
                raise ProtocolError(f"SET_VRING_NUM on ring {index} while it runs")
            if not 1 <= num <= self.queue_max:
                raise ProtocolError(f"SET_VRING_NUM: ring {index} of {num} entries "
                                    f"(1..{self.queue_max})")
            ring.num = num
            return []
        if r == Req.SET_VRING_ADDR:
            self._size(msg, VRING_ADDR.size)
            index, flags, desc, used, avail, _log = VRING_ADDR.unpack(p)
            ring = self._ring(msg, index)
            if flags & VRING_F_LOG:
                raise ProtocolError(f"SET_VRING_ADDR: ring {index} asks for used-ring logging")
            if ring.started:
                raise ProtocolError(f"SET_VRING_ADDR on ring {index} while it runs")
            ring.addr = (desc, used, avail)
            return self._maybe_start(index)
        if r == Req.SET_VRING_BASE:
            self._size(msg, VRING_STATE.size)
            index, base = VRING_STATE.unpack(p)
            ring = self._ring(msg, index)
            if ring.started:
                raise ProtocolError(f"SET_VRING_BASE on ring {index} while it runs")
            packed = bool(self.features & bit(34))          # VIRTIO_F_RING_PACKED
            if base > (0xFFFFFFFF if packed else 0xFFFF):
                raise ProtocolError(f"SET_VRING_BASE: ring {index} base {base:#x}")
            ring.base = base
            return []
        if r == Req.GET_VRING_BASE:
            self._size(msg, VRING_STATE.size)
            index = VRING_STATE.unpack(p)[0]
            ring = self._ring(msg, index)
            ring.started = False
            ring.kicked = False
            if not self.features & bit(F_PROTOCOL_FEATURES):
                ring.enabled = True
            return [RingStop(index)]
        if r in (Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR):
            self._size(msg, 8)
            value = U64.unpack(p)[0]
            index = value & VRING_INDEX_MASK
            nofd = bool(value & VRING_NOFD)
            if value & ~(VRING_INDEX_MASK | VRING_NOFD):
                raise ProtocolError(f"{msg.name}: reserved bits in {value:#x}")
            if len(msg.fds) != (0 if nofd else 1):
                raise ProtocolError(f"{msg.name}: {len(msg.fds)} file descriptors "
                                    f"({'none' if nofd else 'one'} expected)")
            ring = self._ring(msg, index)
            kind = {Req.SET_VRING_KICK: "kick", Req.SET_VRING_CALL: "call",
                    Req.SET_VRING_ERR: "err"}[Req(r)]
            events: list[Event] = [RingFd(kind, index, None if nofd else msg.fds[0])]
            msg.fds = []
            if kind == "kick":
                ring.kicked = True
                events += self._maybe_start(index)
            return events
        if r == Req.SET_VRING_ENABLE:
            self._size(msg, VRING_STATE.size)
            index, on = VRING_STATE.unpack(p)
            ring = self._ring(msg, index)
            if on not in (0, 1):
                raise ProtocolError(f"SET_VRING_ENABLE: ring {index} with {on}")
            # QEMU disables rings before it sets features; refused only once features
            # were agreed without VHOST_USER_F_PROTOCOL_FEATURES
            if self.features_set and not self.features & bit(F_PROTOCOL_FEATURES):
                raise ProtocolError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
            ring.enabled = bool(on)
            if not on and ring.started:
                ring.started = False
                return [RingPause(index)]
            return self._maybe_start(index)
        if r == Req.GET_CONFIG:
            if not self.protocol_features & bit(PF.CONFIG):
                raise ProtocolError("GET_CONFIG without the CONFIG protocol feature")
            offset, size, flags = self._config_hdr(msg)
            self._size(msg, CONFIG_HDR.size + size)
            return [GetConfig(offset, size, flags)]
        if r == Req.SET_CONFIG:
            if not self.protocol_features & bit(PF.CONFIG):
                raise ProtocolError("SET_CONFIG without the CONFIG protocol feature")
            offset, size, flags = self._config_hdr(msg)
            self._size(msg, CONFIG_HDR.size + size)
            return [SetConfig(offset, flags, p[CONFIG_HDR.size:])]
        try:
            name = Req(r).name
        except ValueError:
            raise ProtocolError(f"unknown request {r}") from None
        raise ProtocolError(f"{name} is not supported (its feature was not offered)")

    def _config_hdr(self, msg: Message) -> tuple[int, int, int]:
        if len(msg.payload) < CONFIG_HDR.size:
            raise ProtocolError(f"{msg.name}: payload of {len(msg.payload)} bytes")
        offset, size, flags = CONFIG_HDR.unpack_from(msg.payload)
        if size > MAX_CONFIG or offset + size > CONFIG_OFFSET_MAX:
            raise ProtocolError(f"{msg.name}: config range {offset}+{size}")
        return offset, size, flags

    def _mem_table(self, msg: Message) -> SetMemTable:
        p = msg.payload
        if len(p) < MEM_HDR.size:
            raise ProtocolError(f"SET_MEM_TABLE: payload of {len(p)} bytes")
        n = MEM_HDR.unpack_from(p)[0]
        if not 1 <= n <= MAX_REGIONS:
            raise ProtocolError(f"SET_MEM_TABLE: {n} regions (1..{MAX_REGIONS})")
        self._size(msg, MEM_HDR.size + MEM_REGION.size * n)
        if len(msg.fds) != n:
            raise ProtocolError(f"SET_MEM_TABLE: {n} regions but {len(msg.fds)} file descriptors")
        regions = []
        for i in range(n):
            gpa, size, uaddr, offset = MEM_REGION.unpack_from(p, MEM_HDR.size + MEM_REGION.size * i)
            if size == 0:
                raise ProtocolError(f"SET_MEM_TABLE: region {i} is empty")
            if gpa + size > 1 << 64 or uaddr + size > 1 << 64 or offset + size > 1 << 64:
                raise ProtocolError(f"SET_MEM_TABLE: region {i} wraps the address space")
            regions.append(Region(gpa, size, uaddr, offset, msg.fds[i]))
        for key in ("gpa", "uaddr"):
            rs = sorted(regions, key=lambda r: getattr(r, key))
            for a, b in zip(rs, rs[1:]):
                if getattr(a, key) + a.size > getattr(b, key):
                    raise ProtocolError(f"SET_MEM_TABLE: regions overlap at {key} "
                                        f"{getattr(b, key):#x}")
        if any(ring.started for ring in self.rings):
            raise ProtocolError("SET_MEM_TABLE while rings run")
        msg.fds = []
        self.regions = regions
        return SetMemTable(regions)

    # -- ring life ---------------------------------------------------------------------------
    def _maybe_start_all(self) -> list[Event]:
        out: list[Event] = []
        for i in range(self.num_queues):
            out += self._maybe_start(i)
        return out

    def _maybe_start(self, index: int) -> list[Event]:
        ring = self.rings[index]
        if ring.started or not (ring.kicked and ring.enabled and ring.addr and ring.num
                                and self.features_set and self.regions):
            return []
        desc, used, avail = ring.addr
        packed = bool(self.features & bit(34))          # VIRTIO_F_RING_PACKED
        if packed:
            dsz, asz, usz = 16 * ring.num, 4, 4
        else:
            if ring.num & (ring.num - 1):
                raise ProtocolError(f"ring {index}: split ring of {ring.num} entries "
                                    f"(a power of two)")
            dsz, asz, usz = 16 * ring.num, 6 + 2 * ring.num, 6 + 8 * ring.num
        start = RingStart(index, ring.num, self.translate(desc, dsz), self.translate(avail, asz),
                          self.translate(used, usz), ring.base, self.features)
        ring.started = True
        return [start]
