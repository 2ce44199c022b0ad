"""Well-formed inputs for each fuzz target, built with the same structures the drivers use:
the fuzzer starts from work a real guest would do (a bridge session that opens a device,
registers a queue and sends a request; a full vhost-user handshake) and mutates from there,
instead of having to discover magic numbers and call sequences first."""

from __future__ import annotations

import struct

from alacrity.memory import GuestMemory

NEXT, WRITE, INDIRECT, AVAIL = 1, 2, 4, 1 << 7


def _ram(build, size: int = 0x8000) -> bytes:
    """Lay out guest RAM with `build(mem)` on scratch memory; its bytes."""
    mem = GuestMemory.create([(0, size)], name="alacrity-seed")
    try:
        build(mem)
        return mem.read(0, size).rstrip(b"\0")
    finally:
        mem.close()


def split() -> list[bytes]:
    d = struct.Struct("<QIHH")

    def build(mem: GuestMemory) -> None:
        size = 8
        avail = 16 * size
        d.pack_into(mem.view(0, 16), 0, 0x1000, 16, NEXT, 1)
        d.pack_into(mem.view(16, 16), 0, 0x1100, 512, WRITE, 0)
        d.pack_into(mem.view(32, 16), 0, 0x2000, 32, INDIRECT, 0)
        d.pack_into(mem.view(0x2000, 16), 0, 0x3000, 64, NEXT, 1)
        d.pack_into(mem.view(0x2010, 16), 0, 0x3100, 64, WRITE, 0)
        mem.write(avail, struct.pack("<HHHH", 0, 2, 0, 2))
    return [bytes([3 | 16, 16]) + _ram(build), bytes([3 | 8, 16]) + _ram(build)]


def packed() -> list[bytes]:
    d = struct.Struct("<QIHH")

    def build(mem: GuestMemory) -> None:
        d.pack_into(mem.view(0, 16), 0, 0x1000, 16, 0, AVAIL | NEXT)
        d.pack_into(mem.view(16, 16), 0, 0x1100, 512, 0, AVAIL | WRITE)
        d.pack_into(mem.view(32, 16), 0, 0x2000, 32, 1, AVAIL | INDIRECT)
        d.pack_into(mem.view(0x2000, 16), 0, 0x3000, 64, 0, 0)
        d.pack_into(mem.view(0x2010, 16), 0, 0x3100, 64, 0, WRITE)
    return [bytes([(3 << 1) | 32, 16]) + _ram(build)]


def ioq() -> list[bytes]:
    from alacrity.vbus import ioq as Q
    from alacrity.vbus.shm_signal import NORTH

    def build(mem: GuestMemory) -> None:
        Q.init_ring(mem, 0, 8)
        Q.Ioq(mem, 0, NORTH).post([(i, 0x1000 + 0x100 * i, 64) for i in range(3)])
    ops = bytes([3 << 3 | 0, 3 << 3 | 1, 2, 3, 4, 5, 6, 7])
    return [bytes([2]) + ops + _ram(build)]


def vbus_bridge() -> list[bytes]:
    from alacrity.vbus import abi
    from alacrity.vbus import ioq as Q
    from alacrity.vbus import vblock as V
    from alacrity.vbus.shm_signal import NORTH
    call = abi.CALL_DESC.pack
    ops: list[tuple[int, int, int, int]] = []

    def build(mem: GuestMemory) -> None:
        w = mem.write
        ops.append((0, abi.NEGOTIATE, abi.NEGOTIATE_S.size, 0x100))
        w(0x100, abi.NEGOTIATE_S.pack(abi.BRIDGE_MAGIC, abi.HC_VERSION, 0))
        ops.append((0, abi.QREG, abi.BUSREG_HDR.size + abi.EVENTQREG.size, 0x200))
        w(0x200, abi.BUSREG_HDR.pack(1) + abi.EVENTQREG.pack(8, 0x1000, 0x2000))
        Q.init_ring(mem, 0x1000, 8)
        # DEVOPEN vblock (device 1), DEVSHM its queue, post one read, ring its doorbell
        ops.append((0, abi.SLOWCALL, abi.CALL_DESC.size, 0x300))
        w(0x300, call(abi.DEVOPEN, abi.DEVOPEN_S.size, 0x380))
        w(0x380, abi.DEVOPEN_S.pack(1, V.VERSION, 0))
        ops.append((0, abi.SLOWCALL, abi.CALL_DESC.size, 0x400))
        w(0x400, call(abi.DEVSHM, abi.DEVSHM_S.size, 0x480))
        w(0x480, abi.DEVSHM_S.pack(1, V.QUEUE_ID, Q.ring_size(8), 0, Q.SIGNAL_OFFSET, 0, 7,
                                   0x3000))
        Q.init_ring(mem, 0x3000, 8)
        w(0x4000, V.REQ.pack(V.T_IN, 0, 0, 1) + V.IOV.pack(512, 0x5000))
        north = Q.Ioq(mem, 0x3000, NORTH, cross=lambda: None)
        north.post([(0, 0x4000, V.request_size(1))])
        north.signal.inject()                             # marks the signal pending
        ops.append((1, 1, 0, 0))                          # shmsignal doorbell, handle 1
        # DEVOPEN venet (device 2), DEVCALL MACQUERY, the same call as a fastcall
        ops.append((0, abi.SLOWCALL, abi.CALL_DESC.size, 0x500))
        w(0x500, call(abi.DEVOPEN, abi.DEVOPEN_S.size, 0x580))
        w(0x580, abi.DEVOPEN_S.pack(2, 1, 0))
        ops.append((0, abi.SLOWCALL, abi.CALL_DESC.size, 0x600))
        w(0x600, call(abi.DEVCALL, abi.DEVCALL_S.size, 0x680))
        w(0x680, abi.DEVCALL_S.pack(2, 2, 6, 0, 0x700))
        ops.append((2, 0, 0, 0))                          # event queue doorbell
        ops.append((0, abi.FASTCALL_ADD, abi.CALL_DESC.size, 0x800))
        w(0x800, call(0, abi.FASTCALL_DESC.size, 0x880))
        w(0x880, abi.FASTCALL_DESC.pack(abi.DEVCALL, abi.DEVCALL_S.size, 0x680, 0))
        ops.append((3, 0, 0, 0))                          # fastcall doorbell, cpu 0
    ram = _ram(build)
    head = bytes([len(ops) - 1]) + b"".join(struct.pack("<BIIQ", *op) for op in ops)
    return [head + ram]


def venet() -> list[bytes]:
    from alacrity.vbus import venet as E
    frame = b"\x02" * 12 + b"\x88\xb5" + bytes(range(46))
    sg = E.SG.pack(0, 0, len(frame), 0, 0, 0, 0, 0, 1)
    out = []
    # RAM from the input starts at 0x1000 (the PMTD pool), data at 0x2000
    pool = bytearray(0x1000)
    pool[0:E.sg_size(1)] = sg + E.IOV.pack(len(frame), 0x2000)   # PMTD: by pool offset
    pool[0x100:0x100 + E.sg_size(1)] = sg + E.IOV.pack(len(frame), 0x2000)
    ram = bytes(pool) + frame
    for setup, ptr, length in ((7, 0x2000, len(frame)),             # flat
                               (7 | 8, 0x1100, E.sg_size(1)),        # SG, descriptor in RAM
                               (7 | 16, 0, E.sg_size(1))):           # PMTD, pool offset 0
        out.append(bytes([setup, 1]) + struct.pack("<QI", ptr, length) + ram)
    return out


def vhost_user() -> list[bytes]:
    from alacrity.vhost_user import protocol as P
    from alacrity.virtio import spec
    R = P.Req
    feats = spec.bit(spec.F_VERSION_1) | P.bit(P.F_PROTOCOL_FEATURES)
    msgs = [(P.encode(R.GET_FEATURES), 0),
            (P.encode(R.SET_FEATURES, P.U64.pack(feats)), 0),
            (P.encode(R.GET_PROTOCOL_FEATURES), 0),
            (P.encode(R.SET_PROTOCOL_FEATURES, P.U64.pack(P.bit(P.PF.REPLY_ACK))), 0),
            (P.encode(R.SET_MEM_TABLE, P.MEM_HDR.pack(1, 0)
                      + P.MEM_REGION.pack(0, 1 << 20, 0x7F0000000000, 0), need_reply=True), 1),
            (P.encode(R.SET_VRING_NUM, P.VRING_STATE.pack(0, 64)), 0),
            (P.encode(R.SET_VRING_BASE, P.VRING_STATE.pack(0, 0)), 0),
            (P.encode(R.SET_VRING_ADDR, P.VRING_ADDR.pack(0, 0, 0x7F0000010000, 0x7F0000012000,
                                                         0x7F0000011000, 0)), 0),
            (P.encode(R.SET_VRING_CALL, P.U64.pack(0)), 1),
            (P.encode(R.SET_VRING_KICK, P.U64.pack(0)), 1),
            (P.encode(R.SET_VRING_ENABLE, P.VRING_STATE.pack(0, 1)), 0),
            (P.encode(R.GET_VRING_BASE, P.VRING_STATE.pack(0, 0)), 0)]
    stream = b""
    for data, nfds in msgs:
        assert len(data) <= 64
        stream += bytes([nfds << 6 | (len(data) - 1)]) + data
    return [bytes([1]) + stream]


SEEDS = {"split": split, "packed": packed, "ioq": ioq, "vbus-bridge": vbus_bridge,
         "venet": venet, "vhost-user": vhost_user}
