"""The hostile corpus for vhost-user: malformed messages and hostile rings, over a real
socket to a real VhostUserServer serving virtio-blk on an image file.

The frontend is trusted with memory (it shares it) but not with message syntax, and the
rings in that memory are written by a guest. vhost-user's answer to both is the same: one
log line, the connection closes, and the server serves the next frontend. The memory this
frontend shares is guarded RAM (tests/hostile/guard.py): two regions with canary pages
before, between and after them in the memfd, passed with mmap offsets, so a backend that
mapped or touched more than each region would show it.
"""

from __future__ import annotations

import os
import socket

import pytest

from alacrity.vhost_user import protocol as P
from alacrity.virtio import spec
from alacrity.virtio.blk import T_IN, T_OUT
from tests.helpers import NEXT, WRITE, RawPackedRing, RawRing, until
from tests.hostile.guard import PAGE, GuardedRam, deadline, leaked
from tests.test_vhost_user import (OWNER, blk_driver, blk_server, check_blk,  # noqa: F401
                                   closed_by_peer, mem_table, raw_client, send_fds)

R = P.Req
U64 = 1 << 64
UADDR_A, UADDR_B = 0x7F00_0000_0000, 0x7F10_0000_0000   # the frontend's own addresses
HDR, STATUS, DATA = 0x20000, 0x21000, 0x30000


def rejected(srv, img, caplog, data: bytes, fds: list[int], *, half_close: bool = False) -> None:
    """Send `data` (with fds); the server must close the connection, count one protocol
    error, keep the image clean, and serve the next frontend."""
    errors = srv.protocol_errors
    s = raw_client(srv.path)
    try:
        with deadline():
            send_fds(s, data, fds)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            assert closed_by_peer(s), "the server kept the connection"
    finally:
        s.close()
        for fd in fds:
            os.close(fd)
    with deadline():
        until(lambda: srv.protocol_errors == errors + 1)
    assert srv.last_error
    lines = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1 and "\n" not in lines[0].getMessage()
    served(srv, img)


def served(srv, img) -> None:
    g, _, drv = blk_driver(srv.path)
    try:
        with deadline(10):
            check_blk(drv, img, 8)
    finally:
        g.close()


def eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


STATE = P.VRING_STATE.pack
FEATURES = P.encode(R.SET_FEATURES, P.U64.pack(spec.bit(spec.F_VERSION_1)))


# -- messages ------------------------------------------------------------------------------------
MESSAGES = {
    # name: (bytes, number of fds, half-close after sending)
    "truncated header": (b"\x05\x00\x00\x00\x01", 0, True),
    "size larger than the payload": (P.HEADER.pack(R.SET_FEATURES, 1, 8) + b"\0\0\0", 0, True),
    "size above the protocol maximum": (P.HEADER.pack(R.SET_MEM_TABLE, 1, 1 << 30), 0, False),
    "payload shorter than the request needs":
        (OWNER + P.encode(R.SET_VRING_NUM, b"\0\0\0"), 0, False),
    "wrong fd count: kick without its fd": (OWNER + P.encode(R.SET_VRING_KICK, P.U64.pack(0)),
                                            0, False),
    "wrong fd count: two fds for one kick": (OWNER + P.encode(R.SET_VRING_KICK, P.U64.pack(0)),
                                             2, False),
    "wrong fd count: fds with a message that takes none": (OWNER + FEATURES, 1, False),
    "wrong fd count: fewer fds than regions": (OWNER + P.encode(R.SET_MEM_TABLE, mem_table(
        (0, 1 << 16, UADDR_A, 0), (1 << 16, 1 << 16, UADDR_B, 0))), 1, False),
    "region count disagrees with the size": (OWNER + P.encode(R.SET_MEM_TABLE, P.MEM_HDR.pack(3, 0)
                                                             + P.MEM_REGION.pack(0, 1 << 16, UADDR_A, 0)),
                                            1, False),
    "more regions than allowed": (OWNER + P.encode(R.SET_MEM_TABLE, mem_table(
        *[(i << 16, 1 << 16, UADDR_A + (i << 16), 0) for i in range(9)])), 8, False),
    "overlapping regions (guest addresses)": (OWNER + P.encode(R.SET_MEM_TABLE, mem_table(
        (0, 1 << 16, UADDR_A, 0), (1 << 15, 1 << 16, UADDR_B, 0))), 2, False),
    "overlapping regions (frontend addresses)": (OWNER + P.encode(R.SET_MEM_TABLE, mem_table(
        (0, 1 << 16, UADDR_A, 0), (1 << 20, 1 << 16, UADDR_A + (1 << 15), 0))), 2, False),
    "empty region": (OWNER + P.encode(R.SET_MEM_TABLE, mem_table((0, 0, UADDR_A, 0))), 1, False),
    "region wrapping 2^64": (OWNER + P.encode(R.SET_MEM_TABLE, mem_table(
        (U64 - (1 << 12), 1 << 16, UADDR_A, 0))), 1, False),
    "vring index out of range": (OWNER + P.encode(R.SET_VRING_NUM, STATE(5, 8)), 0, False),
    "vring index 2^32-1": (OWNER + P.encode(R.SET_VRING_BASE, STATE(0xFFFFFFFF, 0)), 0, False),
    "vring size 0": (OWNER + P.encode(R.SET_VRING_NUM, STATE(0, 0)), 0, False),
    "vring size above the maximum": (OWNER + P.encode(R.SET_VRING_NUM, STATE(0, 1 << 15)), 0,
                                     False),
    "ring message before SET_OWNER": (P.encode(R.SET_VRING_NUM, STATE(0, 8)), 0, False),
    "memory table before SET_OWNER": (P.encode(R.SET_MEM_TABLE, mem_table((0, 1 << 16, UADDR_A,
                                                                           0))), 1, False),
    "features never offered": (OWNER + P.encode(R.SET_FEATURES, P.U64.pack(1 << 63)), 0, False),
    "unknown request": (OWNER + P.encode(200), 0, False),
    "dirty log (unsupported)": (OWNER + P.encode(R.SET_LOG_BASE, bytes(16)), 1, False),
}


@pytest.mark.parametrize("name", list(MESSAGES))
def test_malformed_message(blk_server, caplog, name):
    srv, img = blk_server
    data, nfds, half = MESSAGES[name]
    rejected(srv, img, caplog, data, eventfds(nfds), half_close=half)


# -- rings in shared memory -----------------------------------------------------------------------------
class Frontend:
    """A hand-written frontend sharing guarded RAM: two regions, with mmap offsets."""

    def __init__(self, srv, packed: bool, size: int = 8):
        self.ram = GuardedRam(a_size=4 << 20, b_size=1 << 20)
        self.mem = self.ram.mem
        self.size = size
        self.packed = packed
        self.ring = RawPackedRing(self.mem, size) if packed else RawRing(self.mem, size)
        self.sock = raw_client(srv.path)
        self.kick, self.call = eventfds(2)

    def uaddr(self, gpa: int) -> int:
        return UADDR_A + gpa if gpa < self.ram.a_size else UADDR_B + gpa - self.ram.a_size

    def start(self, ring_addrs: tuple[int, int, int] | None = None) -> None:
        ram = self.ram
        table = mem_table((0, ram.a_size, UADDR_A, PAGE),
                          (ram.a_size, ram.b_size, UADDR_B, 2 * PAGE + ram.a_size))
        r = self.ring
        if ring_addrs is None:
            ring_addrs = ((r.desc, r.avail, r.used) if not self.packed
                          else (r.desc, r.driver, r.device))
        desc, drv, dev = (self.uaddr(a) if a < ram.end else a for a in ring_addrs)
        feats = spec.bit(spec.F_VERSION_1) | (spec.bit(spec.F_RING_PACKED) if self.packed else 0)
        msgs = [(OWNER + P.encode(R.SET_FEATURES, P.U64.pack(feats)), []),
                (P.encode(R.SET_MEM_TABLE, table), [ram.fd, ram.fd]),
                (P.encode(R.SET_VRING_NUM, STATE(0, self.size))
                 + P.encode(R.SET_VRING_BASE, STATE(0, 0 if not self.packed else 1 << 15))
                 + P.encode(R.SET_VRING_ADDR, P.VRING_ADDR.pack(0, 0, desc, dev, drv, 0)), []),
                (P.encode(R.SET_VRING_CALL, P.U64.pack(0)), [self.call]),
                (P.encode(R.SET_VRING_KICK, P.U64.pack(0)), [self.kick])]
        for data, fds in msgs:
            send_fds(self.sock, data, fds)

    def offer(self, elems: list[tuple[int, int, int]]) -> None:
        if self.packed:
            self.ring.offer([(a, n, bool(f & WRITE)) for a, n, f in elems], 0)
            return
        for j, (a, n, f) in enumerate(elems):
            last = j == len(elems) - 1
            self.ring.set_desc(j, a, n, f | (0 if last else NEXT), j + 1)
        self.ring.make_available(0)

    def doorbell(self) -> None:
        os.eventfd_write(self.kick, 1)

    def close(self) -> None:
        self.sock.close()
        os.close(self.kick)
        os.close(self.call)
        self.mem.close()
        self.ram.close()


@pytest.fixture
def frontend(blk_server):
    made = []

    def make(packed: bool) -> Frontend:
        f = Frontend(blk_server[0], packed)
        made.append(f)
        return f
    yield make
    for f in made:
        f.close()


def closed(srv, img, fe: Frontend, caplog) -> None:
    """A ring broke: one log line, the connection closed, nothing outside the shared
    regions touched, and the next frontend is served."""
    with deadline():
        assert closed_by_peer(fe.sock), "the server kept the connection"
    assert srv.last_error.startswith("the frontend broke a ring")
    lines = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1 and "closing the connection" in lines[0].getMessage()
    assert fe.ram.canaries_intact(), "memory outside the shared regions was written"
    assert not leaked(img.read_bytes()), "memory outside the shared regions was read"
    served(srv, img)


def rung_and_closed(srv, img, fe: Frontend, caplog, errors: int) -> None:
    """Ring the doorbell on a ring the test broke: the device counts an error, and the
    server closes the connection (see closed())."""
    fe.doorbell()
    with deadline():
        until(lambda: srv.device.errors > errors)
    closed(srv, img, fe, caplog)


def test_a_good_request_through_the_hand_written_frontend(blk_server, frontend):
    """The control case: the same frontend and ring, well formed, is served."""
    srv, img = blk_server
    fe = frontend(False)
    fe.start()
    fe.mem.write(HDR, P.HEADER.pack(T_IN, 0, 0) + bytes(4))
    fe.mem.write(STATUS, b"\xff")
    fe.offer([(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)])
    fe.doorbell()
    with deadline():
        until(lambda: fe.ring.used_idx() == 1)
    assert fe.mem.read(STATUS, 1) == b"\0" and fe.mem.read(DATA, 512) == img.read_bytes()[:512]


RANGES = {
    "address outside every region": lambda ram: (ram.end + 0x1000, 512),
    "length past the last region": lambda ram: (ram.end - 256, 4096),
    "spanning two regions": lambda ram: (ram.a_size - 2048, 4096),
    "wrapping 2^64": lambda ram: (U64 - 2048, 4096),
}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("case", list(RANGES))
@pytest.mark.parametrize("direction", [T_OUT, T_IN])
def test_descriptor_outside_the_shared_memory(blk_server, frontend, caplog, packed, case,
                                              direction):
    srv, img = blk_server
    fe = frontend(packed)
    fe.start()
    errors = srv.device.errors
    a, n = RANGES[case](fe.ram)
    fe.mem.write(HDR, P.HEADER.pack(direction, 0, 0) + bytes(4))
    fe.offer([(HDR, 16, 0), (a, n, WRITE if direction == T_IN else 0), (STATUS, 1, WRITE)])
    rung_and_closed(srv, img, fe, caplog, errors)


def test_chain_that_loops(blk_server, frontend, caplog):
    srv, img = blk_server
    fe = frontend(False)
    fe.start()
    errors = srv.device.errors
    fe.ring.set_desc(0, HDR, 16, NEXT, 1)
    fe.ring.set_desc(1, DATA, 512, NEXT, 0)
    fe.ring.make_available(0)
    rung_and_closed(srv, img, fe, caplog, errors)


def test_available_index_far_ahead(blk_server, frontend, caplog):
    srv, img = blk_server
    fe = frontend(False)
    fe.start()
    errors = srv.device.errors
    fe.ring.set_avail_idx(0x4000)
    rung_and_closed(srv, img, fe, caplog, errors)


@pytest.mark.parametrize("which", ["descriptor table", "available ring", "used ring"])
def test_ring_addresses_outside_every_region(blk_server, frontend, which):
    srv, img = blk_server
    fe = frontend(False)
    r = fe.ring
    addrs = [r.desc, r.avail, r.used]
    addrs[["descriptor table", "available ring", "used ring"].index(which)] = 0x6000_0000_0000
    errors = srv.protocol_errors
    fe.start(tuple(addrs))
    with deadline():
        assert closed_by_peer(fe.sock)
        until(lambda: srv.protocol_errors > errors)
    assert "no memory region" in srv.last_error or "outside" in srv.last_error
    assert fe.ram.canaries_intact()
    served(srv, img)


def test_ring_straddling_the_end_of_a_region(blk_server, frontend):
    srv, img = blk_server
    fe = frontend(False)
    r = fe.ring
    errors = srv.protocol_errors + srv.device.errors
    fe.start((fe.ram.a_size - 64, r.avail, r.used))     # 8 x 16 bytes from 64 before the end
    with deadline():
        assert closed_by_peer(fe.sock)
        until(lambda: srv.protocol_errors + srv.device.errors > errors)
    assert fe.ram.canaries_intact()
    served(srv, img)
