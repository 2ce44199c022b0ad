"""vhost-user: the sans-I/O protocol, our server (malformed messages, reconnect, 0600, signals)
and our frontend driving it with the same drivers process guests use."""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from alacrity.devices.block import BlockCore, FileBackend
from alacrity.devices.net import LoopbackBackend, NetCore
from alacrity.guest.drivers.virtio_blk import VirtioBlkDriver
from alacrity.guest.drivers.virtio_net import VirtioNetDriver
from alacrity.guest.programs import find_device
from alacrity.iothread import IoThread
from alacrity.vhost_user import protocol as P
from alacrity.vhost_user.backend import VhostUserDevice, VhostUserServer
from alacrity.vhost_user.frontend import VhostUserGuest
from alacrity.virtio import spec
from alacrity.virtio.blk import VirtioBlk
from alacrity.virtio.net import VirtioNet
from tests.helpers import until

R = P.Req


# ------------------------------------------------------------------------------------------
# protocol, sans I/O
# ------------------------------------------------------------------------------------------
def session(**kw) -> P.BackendSession:
    args = dict(features=spec.bit(spec.F_VERSION_1) | spec.bit(spec.F_EVENT_IDX),
                protocol_features=P.bit(P.PF.MQ) | P.bit(P.PF.REPLY_ACK) | P.bit(P.PF.CONFIG),
                num_queues=2, queue_max=256)
    args.update(kw)
    return P.BackendSession(**args)


def msg(request: int, payload: bytes = b"", fds=(), need_reply=False) -> P.Message:
    flags = P.VERSION | (P.FLAG_NEED_REPLY if need_reply else 0)
    return P.Message(request, flags, payload, list(fds))


def owned(s: P.BackendSession, protocol: bool = True) -> P.BackendSession:
    s.receive(msg(R.SET_OWNER))
    f = spec.bit(spec.F_VERSION_1) | (P.bit(P.F_PROTOCOL_FEATURES) if protocol else 0)
    s.receive(msg(R.SET_FEATURES, P.U64.pack(f)))
    return s


def mem_table(*regions):
    """regions: (gpa, size, uaddr, offset)"""
    return P.MEM_HDR.pack(len(regions), 0) + b"".join(P.MEM_REGION.pack(*r) for r in regions)


def configure_ring(s, index=0, fds=(100,), mem=True):
    """Everything but the kick; ring at user address 0x10000 in a region at 0x10000."""
    if mem:
        s.receive(msg(R.SET_MEM_TABLE, mem_table((0, 1 << 20, 0x10000, 0)), fds))
    s.receive(msg(R.SET_VRING_NUM, P.VRING_STATE.pack(index, 64)))
    s.receive(msg(R.SET_VRING_BASE, P.VRING_STATE.pack(index, 5)))
    return s.receive(msg(R.SET_VRING_ADDR, P.VRING_ADDR.pack(index, 0, 0x10000, 0x12000,
                                                                0x11000, 0)))


def test_header_encoding_and_reader_framing():
    data = P.encode(R.GET_FEATURES) + P.encode(R.SET_FEATURES, P.U64.pack(7), need_reply=True)
    assert data[:12] == P.HEADER.pack(1, 1, 0)
    assert P.HEADER.unpack_from(data, 12) == (2, 1 | P.FLAG_NEED_REPLY, 8)
    r = P.Reader()
    out = []
    for i in range(len(data)):                 # byte by byte: framing holds
        out += r.feed(data[i:i + 1])
    assert [(m.request, m.payload, m.need_reply) for m in out] == [
        (1, b"", False), (2, P.U64.pack(7), True)]
    r.eof()                                    # nothing half-received


def test_reader_gives_fds_to_the_message_they_came_with():
    r = P.Reader()
    a = P.encode(R.SET_OWNER)
    b = P.encode(R.SET_VRING_KICK, P.U64.pack(0))
    msgs = r.feed(a + b, [41])
    assert msgs[0].fds == [] and msgs[1].fds == [41]


@pytest.mark.parametrize("data,why", [
    (P.HEADER.pack(1, 2, 0), "version"),
    (P.HEADER.pack(1, 1, P.MAX_PAYLOAD + 1), "payload size"),
    (P.HEADER.pack(1, 1 | P.FLAG_REPLY, 0), "reply flag"),
])
def test_reader_rejects_bad_headers(data, why):
    with pytest.raises(P.ProtocolError, match=why):
        P.Reader().feed(data)


def test_reader_truncated_message_at_eof():
    r = P.Reader()
    assert r.feed(P.HEADER.pack(2, 1, 8) + b"abc") == []      # size larger than what came
    with pytest.raises(P.ProtocolError, match="middle of a message"):
        r.eof()


def test_features_and_protocol_features():
    s = session()
    (ev,) = s.receive(msg(R.GET_FEATURES))
    assert P.U64.unpack(ev.data[12:])[0] == s.offered
    assert s.offered & P.bit(P.F_PROTOCOL_FEATURES)
    assert ev.data[:12] == P.HEADER.pack(R.GET_FEATURES, 1 | P.FLAG_REPLY, 8)
    s.receive(msg(R.SET_OWNER))
    with pytest.raises(P.ProtocolError, match="not offered"):
        s.receive(msg(R.SET_FEATURES, P.U64.pack(1 << 40)))
    with pytest.raises(P.ProtocolError, match="not offered"):
        s.receive(msg(R.SET_PROTOCOL_FEATURES, P.U64.pack(P.bit(P.PF.STATUS))))
    s.receive(msg(R.SET_PROTOCOL_FEATURES, P.U64.pack(P.bit(P.PF.REPLY_ACK))))
    # REPLY_ACK: a request asking for a reply gets an Ack event (status 0 on success)
    evs = s.receive(msg(R.SET_FEATURES, P.U64.pack(spec.bit(spec.F_VERSION_1)), need_reply=True))
    assert isinstance(evs[0], P.SetFeatures) and isinstance(evs[-1], P.Ack)
    assert s.ack(evs[-1].request, True)[12:] == P.U64.pack(0)
    (ev,) = s.receive(msg(R.GET_QUEUE_NUM))
    assert P.U64.unpack(ev.data[12:])[0] == 2


def test_configuration_before_set_owner_is_refused():
    s = session()
    with pytest.raises(P.ProtocolError, match="before SET_OWNER"):
        s.receive(msg(R.SET_VRING_NUM, P.VRING_STATE.pack(0, 64)))
    with pytest.raises(P.ProtocolError, match="before SET_OWNER"):
        s.receive(msg(R.SET_MEM_TABLE, mem_table((0, 4096, 0, 0)), [5]))


@pytest.mark.parametrize("regions,fds,why", [
    ([(0, 0, 0, 0)], 1, "empty"),
    ([(0, 8192, 0, 0), (4096, 8192, 1 << 30, 0)], 2, "overlap"),
    ([(0, 4096, 0, 0), (1 << 20, 4096, 0x800, 0)], 2, "overlap"),     # frontend addresses
    ([(2 ** 64 - 4096, 8192, 0, 0)], 1, "wraps"),
    ([(0, 4096, 0, 0)], 2, "file descriptors"),
    ([(0, 4096, 0, 0)], 0, "file descriptors"),
    ([(i << 20, 4096, i << 20, 0) for i in range(9)], 9, "regions"),
    ([], 0, "regions"),
])
def test_bad_memory_tables(regions, fds, why):
    s = owned(session())
    with pytest.raises(P.ProtocolError, match=why):
        s.receive(msg(R.SET_MEM_TABLE, mem_table(*regions), list(range(100, 100 + fds))))


def test_mem_table_size_must_match_the_region_count():
    s = owned(session())
    with pytest.raises(P.ProtocolError, match="payload"):
        s.receive(msg(R.SET_MEM_TABLE, mem_table((0, 4096, 0, 0))[:-8], [100]))


@pytest.mark.parametrize("request_,payload,fds,why", [
    (R.SET_VRING_NUM, P.VRING_STATE.pack(2, 64), [], "out of range"),
    (R.SET_VRING_NUM, P.VRING_STATE.pack(0, 0), [], "entries"),
    (R.SET_VRING_NUM, P.VRING_STATE.pack(0, 512), [], "entries"),
    (R.SET_VRING_ADDR, P.VRING_ADDR.pack(7, 0, 0, 0, 0, 0), [], "out of range"),
    (R.SET_VRING_ADDR, P.VRING_ADDR.pack(0, 1, 0, 0, 0, 0), [], "logging"),
    (R.SET_VRING_BASE, P.VRING_STATE.pack(0, 1 << 16), [], "base"),
    (R.GET_VRING_BASE, P.VRING_STATE.pack(9, 0), [], "out of range"),
    (R.SET_VRING_KICK, P.U64.pack(0), [], "file descriptors"),
    (R.SET_VRING_KICK, P.U64.pack(P.VRING_NOFD), [100], "file descriptors"),
    (R.SET_VRING_CALL, P.U64.pack(3), [100], "out of range"),
    (R.SET_VRING_ERR, P.U64.pack(1 << 20), [100], "reserved"),
    (R.SET_VRING_ENABLE, P.VRING_STATE.pack(0, 2), [], "with 2"),
    (R.SET_VRING_NUM, P.VRING_STATE.pack(0, 64)[:4], [], "payload"),
    (R.GET_FEATURES, b"", [100], "unexpected file descriptors"),
    (R.SET_LOG_BASE, b"", [], "logging"),
    (R.SET_LOG_FD, b"", [100], "logging"),
    (R.SET_INFLIGHT_FD, b"", [], "not supported"),
    (77, b"", [], "unknown request"),
    (R.GET_CONFIG, P.CONFIG_HDR.pack(250, 10, 0) + bytes(10), [], "config range"),
    (R.GET_CONFIG, P.CONFIG_HDR.pack(0, 10, 0), [], "payload"),
])
def test_malformed_messages_are_protocol_errors(request_, payload, fds, why):
    s = owned(session())
    s.receive(msg(R.SET_PROTOCOL_FEATURES, P.U64.pack(P.bit(P.PF.CONFIG))))
    with pytest.raises(P.ProtocolError, match=why):
        s.receive(msg(request_, payload, fds))


def test_ring_starts_when_kicked_and_enabled_with_protocol_features():
    s = owned(session())
    assert configure_ring(s) == []
    evs = s.receive(msg(R.SET_VRING_KICK, P.U64.pack(0), [101]))
    assert [type(e) for e in evs] == [P.RingFd]          # kicked, but still disabled
    evs = s.receive(msg(R.SET_VRING_ENABLE, P.VRING_STATE.pack(0, 1)))
    (start,) = evs
    assert isinstance(start, P.RingStart)
    # frontend addresses translated through the table: user 0x10000 is guest physical 0
    assert (start.desc, start.driver, start.device, start.base, start.num) == (
        0, 0x1000, 0x2000, 5, 64)
    # running rings cannot be reconfigured
    with pytest.raises(P.ProtocolError, match="while it runs"):
        s.receive(msg(R.SET_VRING_NUM, P.VRING_STATE.pack(0, 32)))
    # disable pauses, enable starts again, GET_VRING_BASE stops until the next kick
    assert isinstance(s.receive(msg(R.SET_VRING_ENABLE, P.VRING_STATE.pack(0, 0)))[0],
                      P.RingPause)
    assert isinstance(s.receive(msg(R.SET_VRING_ENABLE, P.VRING_STATE.pack(0, 1)))[0],
                      P.RingStart)
    assert isinstance(s.receive(msg(R.GET_VRING_BASE, P.VRING_STATE.pack(0, 0)))[0],
                      P.RingStop)
    assert s.vring_base(0, 9)[12:] == P.VRING_STATE.pack(0, 9)
    assert s.receive(msg(R.SET_VRING_ENABLE, P.VRING_STATE.pack(0, 1))) == []
    evs = s.receive(msg(R.SET_VRING_KICK, P.U64.pack(0), [102]))
    assert isinstance(evs[-1], P.RingStart)


def test_ring_without_protocol_features_starts_on_kick():
    s = owned(session(), protocol=False)
    configure_ring(s)
    evs = s.receive(msg(R.SET_VRING_KICK, P.U64.pack(0 | P.VRING_NOFD)))
    assert evs[0].fd is None and isinstance(evs[-1], P.RingStart)
    with pytest.raises(P.ProtocolError, match="PROTOCOL_FEATURES"):
        s.receive(msg(R.SET_VRING_ENABLE, P.VRING_STATE.pack(0, 1)))


def test_ring_addresses_outside_every_region():
    s = owned(session())
    s.receive(msg(R.SET_MEM_TABLE, mem_table((0, 0x2000, 0x10000, 0)), [100]))
    s.receive(msg(R.SET_VRING_NUM, P.VRING_STATE.pack(0, 64)))
    s.receive(msg(R.SET_VRING_ADDR, P.VRING_ADDR.pack(0, 0, 0x10000, 0x90000, 0x11000, 0)))
    s.receive(msg(R.SET_VRING_ENABLE, P.VRING_STATE.pack(0, 1)))
    with pytest.raises(P.ProtocolError, match="no memory region"):
        s.receive(msg(R.SET_VRING_KICK, P.U64.pack(0), [101]))


def test_split_ring_size_must_be_a_power_of_two():
    s = owned(session())
    s.receive(msg(R.SET_MEM_TABLE, mem_table((0, 1 << 20, 0x10000, 0)), [100]))
    s.receive(msg(R.SET_VRING_NUM, P.VRING_STATE.pack(0, 100)))
    s.receive(msg(R.SET_VRING_ADDR, P.VRING_ADDR.pack(0, 0, 0x10000, 0x12000, 0x11000, 0)))
    s.receive(msg(R.SET_VRING_ENABLE, P.VRING_STATE.pack(0, 1)))
    with pytest.raises(P.ProtocolError, match="power of two"):
        s.receive(msg(R.SET_VRING_KICK, P.U64.pack(0), [101]))


def test_reset_owner_forgets_everything():
    s = owned(session())
    configure_ring(s)
    (ev,) = s.receive(msg(R.RESET_OWNER))
    assert isinstance(ev, P.ResetOwner)
    assert not s.owner and not s.regions and s.rings[0].addr is None


# ------------------------------------------------------------------------------------------
# the server, over a real socket
# ------------------------------------------------------------------------------------------
@pytest.fixture
def blk_server(tmp_path):
    img = tmp_path / "img"
    img.write_bytes(os.urandom(1 << 20))
    io = IoThread(0.0, idle_spin_us=50).start()
    be = FileBackend(str(img))
    dev = VhostUserDevice(VirtioBlk(BlockCore(be)), io)
    srv = VhostUserServer(str(tmp_path / "sock"), dev, io)
    yield srv, img
    srv.close()
    io.close()
    be.close()


def blk_driver(path: str, packed: bool = False, depth: int = 4):
    g = VhostUserGuest(path, spec.ID_BLOCK, 16 << 20)
    t = find_device(g, spec.ID_BLOCK)
    return g, t, VirtioBlkDriver(t, depth=depth, packed=packed)


def check_blk(drv, img, sector: int) -> None:
    data = os.urandom(4096)
    drv.write(sector, data)
    drv.flush()
    assert img.read_bytes()[sector * 512:sector * 512 + 4096] == data
    assert drv.read(sector, 4096) == data


def test_socket_mode_0600(blk_server):
    srv, _ = blk_server
    assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(srv.path).st_mode)


@pytest.mark.parametrize("packed", [False, True])
def test_blk_through_our_server(blk_server, packed):
    srv, img = blk_server
    g, t, drv = blk_driver(srv.path, packed)
    try:
        assert t.has(spec.F_RING_PACKED) == packed and t.has(spec.F_EVENT_IDX)
        assert drv.capacity == (1 << 20) // 512
        for sector in (0, 17, 2040):
            check_blk(drv, img, sector)
        assert drv.get_id()
    finally:
        g.close()
    until(lambda: not srv.info()["connected"])


def raw_client(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                 if fds else [])


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        while True:
            if sock.recv(4096) == b"":
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


OWNER = P.encode(R.SET_OWNER)


@pytest.mark.parametrize("name,data,nfds,close", [
    ("truncated header", b"\x01\x00\x00", 0, True),
    ("size larger than the payload", P.HEADER.pack(R.SET_FEATURES, 1, 8) + b"\0\0", 0, True),
    ("wrong number of fds", OWNER + P.encode(R.SET_VRING_KICK, P.U64.pack(0)), 2, False),
    ("unknown request", P.encode(99), 0, False),
    ("ring index out of range", OWNER + P.encode(R.SET_VRING_NUM, P.VRING_STATE.pack(5, 8)), 0,
     False),
    ("overlapping regions", OWNER + P.encode(R.SET_MEM_TABLE, mem_table(
        (0, 1 << 16, 0, 0), (1 << 15, 1 << 16, 1 << 20, 0))), 2, False),
    ("empty region", OWNER + P.encode(R.SET_MEM_TABLE, mem_table((0, 0, 0, 0))), 1, False),
    ("payload larger than allowed", P.HEADER.pack(R.SET_FEATURES, 1, 1 << 20), 0, False),
    ("ring message before SET_OWNER", P.encode(R.SET_VRING_NUM, P.VRING_STATE.pack(0, 8)), 0,
     False),
])
def test_malformed_message_ends_the_connection_and_the_server_keeps_serving(
        blk_server, caplog, name, data, nfds, close):
    srv, img = blk_server
    errors = srv.protocol_errors
    fds = [os.eventfd(0) for _ in range(nfds)]
    s = raw_client(srv.path)
    try:
        send_fds(s, data, fds)
        if close:
            s.shutdown(socket.SHUT_WR)          # the rest never comes
        assert closed_by_peer(s), f"{name}: the server kept the connection"
    finally:
        s.close()
        for fd in fds:
            os.close(fd)
    until(lambda: srv.protocol_errors == errors + 1)
    assert srv.last_error
    lines = [r for r in caplog.records if r.name == "alacrity.vhost_user" and r.levelname == "ERROR"]
    assert len(lines) == 1 and "\n" not in lines[0].getMessage()
    # the next frontend gets a working device
    g, _, drv = blk_driver(srv.path)
    try:
        check_blk(drv, img, 8)
    finally:
        g.close()


def test_mem_table_with_unmappable_fd(blk_server):
    srv, img = blk_server
    s = raw_client(srv.path)
    r, w = os.pipe()
    try:
        send_fds(s, OWNER + P.encode(R.SET_MEM_TABLE, mem_table((0, 1 << 16, 0, 0))), [r])
        assert closed_by_peer(s)
    finally:
        s.close()
        os.close(r)
        os.close(w)
    assert "cannot map" in srv.last_error


@pytest.mark.parametrize("packed", [False, True])
def test_reconnect_resumes_from_vring_base(blk_server, packed):
    """A frontend that goes away and comes back resumes its ring where GET_VRING_BASE
    said, with the same ring memory (as QEMU does when the backend restarts)."""
    srv, img = blk_server
    g, t, drv = blk_driver(srv.path, packed)
    try:
        for i in range(5):
            check_blk(drv, img, 8 * i)          # the ring moves on: 15 requests
        base = t.stop_queue(0)
        q = t.queues[0]
        if packed:      # the device stopped where the driver is: every request completed
            assert base & 0xFFFF == q.next_avail | q.avail_wrap << 15 and base & 0xFFFF != 1 << 15
            assert base >> 16 == q.next_used | q.used_wrap << 15
        else:
            assert base == 15
        t.reconnect({0: base})
        until(lambda: srv.connections == 2)
        for i in range(5):
            check_blk(drv, img, 100 + 8 * i)
    finally:
        g.close()


def test_abrupt_disconnect_then_a_new_frontend(blk_server):
    srv, img = blk_server
    g, t, drv = blk_driver(srv.path)
    check_blk(drv, img, 0)
    t.c.sock.shutdown(socket.SHUT_RDWR)         # gone without GET_VRING_BASE
    until(lambda: not srv.info()["connected"])
    g.close()
    g, t, drv = blk_driver(srv.path, packed=True)
    try:
        check_blk(drv, img, 64)
    finally:
        g.close()


def test_second_frontend_is_refused_while_one_is_connected(blk_server):
    srv, img = blk_server
    g, _, drv = blk_driver(srv.path)
    try:
        s = raw_client(srv.path)
        assert closed_by_peer(s)
        s.close()
        check_blk(drv, img, 0)
    finally:
        g.close()


@pytest.mark.parametrize("packed", [False, True])
def test_net_loopback_through_our_server(tmp_path, packed):
    io = IoThread(0.0, idle_spin_us=50).start()
    be = LoopbackBackend(lossy=True)
    core = NetCore(be)
    dev = VhostUserDevice(VirtioNet(core), io)
    srv = VhostUserServer(str(tmp_path / "sock"), dev, io)
    g = VhostUserGuest(srv.path, spec.ID_NET, 16 << 20)
    try:
        drv = VirtioNetDriver(find_device(g, spec.ID_NET), packed=packed)
        assert drv.mac == core.mac and drv.link_up
        frames = [drv.mac * 2 + b"\x88\xb5" + bytes([i]) * (46 + i) for i in range(50)]
        for f in frames:
            assert drv.send(f)
        drv.kick_tx()
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < len(frames) and time.monotonic() < deadline:
            drv.wait(1.0)
            got += drv.recv()
            drv.kick_rx()
        assert got == frames
        assert core.counters.tx_frames == core.counters.rx_frames == 50
    finally:
        g.close()
        srv.close()
        io.close()


# ------------------------------------------------------------------------------------------
# the command: alacrity serve vhost-user, and bench --guest vhost-user:PATH
# ------------------------------------------------------------------------------------------
def serve(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "alacrity", "serve", "vhost-user", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_socket(path: str, p: subprocess.Popen) -> None:
    until(lambda: os.path.exists(path) or p.poll() is not None, timeout=20)
    assert p.poll() is None, p.stderr.read()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_cleanly_on_signals(tmp_path, sig):
    sock = str(tmp_path / "s")
    img = tmp_path / "img"
    img.write_bytes(bytes(1 << 20))
    p = serve("--socket", sock, "--device", "blk", "--image", str(img))
    try:
        wait_socket(sock, p)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        g, _, drv = blk_driver(sock)
        try:
            check_blk(drv, img, 3)
        finally:
            g.close()
        p.send_signal(sig)
        _, err = p.communicate(timeout=20)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert not os.path.exists(sock)
    counters = json.loads(err.strip().splitlines()[-1].split("stopped: ", 1)[1])
    assert counters["connections"] == 1 and counters["queues"][0]["requests"] >= 3


def test_serve_bad_input_is_one_line_and_exit_2(tmp_path):
    p = serve("--socket", str(tmp_path / "s"), "--device", "blk", "--image",
              str(tmp_path / "missing"))
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2 and len(err.strip().splitlines()) == 1 and "missing" in err
    p = serve("--socket", str(tmp_path / "s"), "--device", "net", "--backend", "pair")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2 and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("what,abi", [("blk", "virtio-split"), ("net", "virtio-packed")])
def test_bench_with_a_vhost_user_guest(tmp_path, what, abi):
    sock = str(tmp_path / "s")
    p = serve("--socket", sock, "--device", what)
    try:
        wait_socket(sock, p)
        extra = ["--depth", "8"] if what == "blk" else []
        b = subprocess.run([sys.executable, "-m", "alacrity", "bench", what, "--abi", abi,
                            "--guest", f"vhost-user:{sock}", "--seconds", "0.5", "--warmup",
                            "0.2", "--json", *extra], capture_output=True, text=True, timeout=120)
        assert b.returncode == 0, b.stderr
        r = json.loads(b.stdout)
        assert r["guest"] == f"vhost-user:{sock}" and r["abi"] == abi
        assert r["ops"] > 100 and r["errors"] == 0
        # the served loopback drops what it has no rx buffers for (as a NIC does): the
        # stream writes off what is still out after a stall instead of waiting for it
        assert r["doorbells_per_op"] > 0 and r["limit"]["ops_per_s"] > 0
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
        counters = json.loads(err.strip().splitlines()[-1].split("stopped: ", 1)[1])
        assert counters["protocol_errors"] == 0
        if what == "net":       # frames written off are exactly the ones the server dropped
            assert r["lost"] == counters["net"]["rx_dropped"]
        assert bool(int(counters["features"], 16) & spec.bit(spec.F_RING_PACKED)) == (
            abi == "virtio-packed")
    finally:
        p.kill()


def test_bench_vhost_user_guest_bad_input():
    b = subprocess.run([sys.executable, "-m", "alacrity", "bench", "blk", "--abi", "vbus",
                        "--guest", "vhost-user:/nonexistent"], capture_output=True, text=True,
                       timeout=60)
    assert b.returncode == 2 and "virtio" in b.stderr
    b = subprocess.run([sys.executable, "-m", "alacrity", "bench", "blk",
                        "--guest", "vhost-user:/nonexistent/sock"], capture_output=True,
                       text=True, timeout=60)
    assert b.returncode != 0 and "cannot connect" in b.stderr
    assert len(b.stderr.strip().splitlines()) == 1
