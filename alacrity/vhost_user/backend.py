"""A vhost-user backend: our virtio device models served to another process (QEMU, DPDK's
virtio-user, our own frontend) over a unix socket.

The socket and the connection live on an `IoThread`: the listening socket and the
connection are epoll readers; each message goes through `protocol.BackendSession` and the
resulting events are acted on here: memory tables are mapped (`GuestMemory.from_fds`), rings
become `VirtQueue`s of a `QueueHost` (the same serving code virtio-mmio uses), kick fds
become readers, call fds are written for interrupts. One frontend at a time; when it goes
away every ring stops, the memory is unmapped and the device waits for the next one, which
resumes from the positions it sends (SET_VRING_BASE). A message that breaks the protocol
ends that connection with one log line; the server keeps serving.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import stat
from typing import Any, Callable

from alacrity.errors import GuestError
from alacrity.iothread import IoThread
from alacrity.limits import DEFAULT, Limits
from alacrity.memory import GuestMemory, RegionInfo
from alacrity.virtio import spec
from alacrity.virtio.device import Notify, VirtioDevice
from alacrity.virtio.host import QueueHost
from alacrity.vhost_user import protocol as P

log = logging.getLogger("alacrity.vhost_user")

MAX_RECV = P.HEADER.size + P.MAX_PAYLOAD


def recv_with_fds(sock: socket.socket, size: int = MAX_RECV) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(P.MAX_FDS * fds.itemsize),
                                           socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise P.ProtocolError("too many file descriptors with one message (truncated)")
    return data, list(fds)


class VhostUserDevice(QueueHost):
    """The device side of one vhost-user connection at a time."""

    def __init__(self, model: VirtioDevice, io: IoThread, *, notify: Notify = Notify.MITIGATED,
                 offer_packed: bool = True, name: str | None = None, limits: Limits = DEFAULT):
        # memory comes with SET_MEM_TABLE; until then there is none
        super().__init__(model, None, name=name or model.name, notify=notify,  # type: ignore[arg-type]
                         defer=io.defer, limits=limits)
        self.io = io
        self.features = (model.device_features() | spec.bit(spec.F_VERSION_1)
                         | spec.bit(spec.F_EVENT_IDX) | spec.bit(spec.F_INDIRECT_DESC)
                         | (spec.bit(spec.F_RING_PACKED) if offer_packed else 0))
        self.protocol_features = (P.bit(P.PF.MQ) | P.bit(P.PF.REPLY_ACK) | P.bit(P.PF.CONFIG))
        self.on_fail: Callable[[str], None] = lambda why: None   # the server drops the link
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}
        self.err_fds: dict[int, int] = {}
        self.connected = False
        self.negotiated = 0          # the last SET_FEATURES (kept after a disconnect: counters)

    # -- QueueHost --------------------------------------------------------------------------
    def fail(self, reason: str) -> None:
        """A ring broke the rules: the connection ends (the frontend may come back)."""
        if self._mark_broken(reason, "closing the connection"):
            self.io.call(lambda: self.on_fail(reason))

    def live(self) -> bool:
        return self.connected and not self.broken

    # -- connection life ------------------------------------------------------------------------
    def attach(self) -> P.BackendSession:
        self.connected = True
        self.broken = False
        return P.BackendSession(features=self.features, protocol_features=self.protocol_features,
                                num_queues=self.model.num_queues, queue_max=self.queue_max)

    def detach(self) -> None:
        """The frontend went away: stop every ring, unmap memory, reset the model."""
        with self.lock:
            self.connected = False
            for i in range(len(self.queues)):
                self._stop(i)
            self.io.remove_poller(self)
            for fds in (self.kick_fds, self.call_fds, self.err_fds):
                for fd in fds.values():
                    os.close(fd)
                fds.clear()
            self._unmap()
            self.model.reset()

    def _unmap(self) -> None:
        if self.mem is not None:
            self.mem.close()
            self.mem = None  # type: ignore[assignment]

    # -- events ---------------------------------------------------------------------------------
    def handle(self, session: P.BackendSession, ev: P.Event) -> bytes | None:
        """Act on one event; returns bytes to send, if any."""
        if isinstance(ev, P.Send):
            return ev.data
        if isinstance(ev, P.SetFeatures):
            self.negotiated = ev.features
            if not self.model.accept_features(ev.features & ~P.bit(P.F_PROTOCOL_FEATURES)):
                raise P.ProtocolError(f"the device refused features {ev.features:#x}")
            return None
        if isinstance(ev, P.SetMemTable):
            with self.lock:
                self._unmap()
                infos = []
                for r in ev.regions:
                    infos.append(RegionInfo(r.gpa, r.size, r.fd, r.offset))
                try:
                    self.mem = GuestMemory.from_fds(infos)
                except (OSError, ValueError) as e:
                    for r in ev.regions:
                        os.close(r.fd)
                    raise P.ProtocolError(f"SET_MEM_TABLE: cannot map the regions: {e}") from None
            return None
        if isinstance(ev, P.RingFd):
            table = {"kick": self.kick_fds, "call": self.call_fds, "err": self.err_fds}[ev.kind]
            old = table.pop(ev.index, None)
            if ev.kind == "kick" and old is not None:
                self.io.remove_reader(old)
            if old is not None:
                os.close(old)
            if ev.fd is not None:
                table[ev.index] = ev.fd
            return None
        if isinstance(ev, P.RingStart):
            self._start(ev)
            return None
        if isinstance(ev, P.RingStop):
            base = self._stop(ev.index)
            return session.vring_base(ev.index, base)
        if isinstance(ev, P.RingPause):
            self._stop(ev.index)
            return None
        if isinstance(ev, P.GetConfig):
            cfg = self.model.config()
            data = cfg[ev.offset:ev.offset + ev.size].ljust(ev.size, b"\0")
            return session.config_reply(ev.offset, ev.flags, data)
        if isinstance(ev, P.SetConfig):
            self.model.write_config(ev.offset, ev.data)
            return None
        if isinstance(ev, P.ResetOwner):
            self.detach()
            self.connected = True
            return None
        if isinstance(ev, P.Ack):
            return session.ack(ev.request, True)
        raise AssertionError(f"unhandled event {ev!r}")

    def _start(self, ev: P.RingStart) -> None:
        with self.lock:
            if self.mem is None:
                raise P.ProtocolError(f"ring {ev.index} started before SET_MEM_TABLE")
            qi = ev.index
            try:
                ring = self.make_ring(ev.features, ev.num, ev.desc, ev.driver, ev.device,
                                      ev.base)
            except GuestError as e:
                raise P.ProtocolError(f"ring {qi}: {e}") from None
            vq = self.make_queue(qi, ring, lambda qi=qi: self._call(qi))
            self.queues[qi] = vq
            self.active = [q for q in self.queues if q is not None]
            kick = self.kick_fds.get(qi)
            if kick is not None:
                self.io.add_reader(kick, lambda fd=kick, qi=qi: self._kicked(fd, qi))
            if self.notify_mode is Notify.POLL or kick is None:
                self.io.add_poller(self)
            if all(self.queues):
                self.model.activate(self.queues)
            if ring.has_work():
                self._service(vq)

    def _stop(self, qi: int) -> int:
        """Stop serving ring qi; returns its position for GET_VRING_BASE."""
        with self.lock:
            vq = self.queues[qi] if qi < len(self.queues) else None
            kick = self.kick_fds.get(qi)
            if kick is not None:
                self.io.remove_reader(kick)
            if vq is None:
                return 0
            self.queues[qi] = None
            self.active = [q for q in self.queues if q is not None]
            ring = vq.ring
            if hasattr(ring, "avail_wrap"):      # packed: avail, then used (as QEMU reads it)
                return (ring.next_avail | ring.avail_wrap << 15
                        | (ring.next_used | ring.used_wrap << 15) << 16)
            return ring.last_avail

    def _call(self, qi: int) -> None:
        """Interrupt the frontend for ring qi (its current call fd, if it gave one)."""
        fd = self.call_fds.get(qi)
        if fd is not None:
            os.eventfd_write(fd, 1)

    def _kicked(self, fd: int, qi: int) -> None:
        try:
            n = os.eventfd_read(fd)
        except BlockingIOError:
            return
        except OSError:
            return
        self.stats[qi].doorbells += n
        with self.lock:
            vq = self.queues[qi] if qi < len(self.queues) else None
            if vq is None or not self.live() or self.polling:
                return
            self._service(vq)


class VhostUserServer:
    """Listens on a unix socket and serves one frontend at a time."""

    def __init__(self, path: str, device: VhostUserDevice, io: IoThread):
        self.path = path
        self.device = device
        self.io = io
        self.conn: socket.socket | None = None
        self.session: P.BackendSession | None = None
        self.reader: P.Reader | None = None
        self.connections = 0
        self.protocol_errors = 0
        self.last_error = ""
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        os.chmod(path, 0o600)        # before listen(): nobody can connect before this
        self.sock.listen(1)
        self.sock.setblocking(False)
        # the device logged its one line already ("guest error: ...; closing the connection")
        device.on_fail = lambda why: self._drop(f"the frontend broke a ring: {why}", logged=True)
        io.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        if self.conn is not None:
            log.warning("vhost-user %s: a second frontend connected; refused", self.path)
            conn.close()
            return
        conn.setblocking(True)
        self.conn = conn
        self.connections += 1
        self.session = self.device.attach()
        self.reader = P.Reader()
        self.io.add_reader(conn.fileno(), self._readable)
        log.info("vhost-user %s: frontend connected", self.path)

    def _readable(self) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            try:
                data, fds = recv_with_fds(conn)
            except OSError as e:
                raise P.ProtocolError(f"receive failed: {e}") from None
            assert self.reader is not None and self.session is not None
            if not data:
                for fd in fds:
                    os.close(fd)
                self.reader.eof()
                self._drop(None)
                return
            for msg in self.reader.feed(data, fds):
                log.debug("vhost-user %s: %s %s fds=%d", self.path, msg.name, msg.payload.hex(),
                          len(msg.fds))
                try:
                    events = self.session.receive(msg)
                finally:
                    for fd in msg.fds:        # fds the session did not take
                        os.close(fd)
                for ev in events:
                    out = self.device.handle(self.session, ev)
                    if out:
                        conn.sendall(out)
        except P.ProtocolError as e:
            self.protocol_errors += 1
            self._drop(str(e))
        except OSError as e:
            self._drop(f"connection error: {e}")

    def _drop(self, why: str | None, logged: bool = False) -> None:
        conn = self.conn
        if conn is None:
            return
        if why:
            self.last_error = why
            if not logged:
                log.error("vhost-user %s: %s; closing the connection", self.path, why)
        else:
            log.info("vhost-user %s: frontend disconnected", self.path)
        self.io.remove_reader(conn.fileno())
        if self.reader is not None:
            self.reader.close_fds()
        conn.close()
        self.conn = None
        self.session = None
        self.reader = None
        self.device.detach()

    def close(self) -> None:
        def run() -> None:
            self._drop(None)
            self.io.remove_reader(self.sock.fileno())
            self.sock.close()
        self.io.call_sync(run)
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def info(self) -> dict[str, Any]:
        return {"path": self.path, "connections": self.connections,
                "protocol_errors": self.protocol_errors, "connected": self.conn is not None,
                "last_error": self.last_error, "features": f"{self.device.negotiated:#x}"}
