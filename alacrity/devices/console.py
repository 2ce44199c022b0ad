"""The console core and its character backends: a file (output only), a pty, or a unix
socket. No ring code here."""

from __future__ import annotations

import logging
import os
import socket
import stat
import tty
from typing import Any, Callable

from alacrity.errors import ConfigError

log = logging.getLogger("alacrity.console")


class CharBackend:
    kind = "char"

    def attach(self, on_input: Callable[[bytes], None]) -> None:
        self.on_input = on_input

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def start(self, io: Any) -> None:
        """Register fds with the machine's I/O thread."""

    def close(self) -> None:
        pass


class FileChar(CharBackend):
    """Output appended to a file; no input."""

    kind = "file"

    def __init__(self, path: str):
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"console file {path}: {e.strerror}") from None
        self.path = path

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PtyChar(CharBackend):
    """A pseudo-terminal: connect to `path` (e.g. with screen or picocom)."""

    kind = "pty"

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)                     # bytes pass unchanged
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.io: Any = None

    def start(self, io: Any) -> None:
        self.io = io
        io.add_reader(self.master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except (BlockingIOError, OSError):
            return
        if data:
            self.on_input(data)

    def write(self, data: bytes) -> None:
        try:
            os.write(self.master, data)
        except BlockingIOError:
            log.warning("pty %s: output dropped (nobody is reading)", self.path)

    def close(self) -> None:
        if self.io is not None:
            self.io.remove_reader(self.master)
        for fd in (self.master, self.slave):
            os.close(fd)


class SocketChar(CharBackend):
    """A listening unix socket (mode 0600); one client at a time. Output with no client
    connected is kept (up to 64 KiB) and sent when one connects."""

    kind = "socket"
    KEEP = 64 * 1024

    def __init__(self, path: str):
        if os.path.exists(path) and not stat.S_ISSOCK(os.stat(path).st_mode):
            raise ConfigError(f"console socket {path}: exists and is not a socket")
        if os.path.exists(path):
            os.unlink(path)
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.listener.bind(path)
        except OSError as e:
            raise ConfigError(f"console socket {path}: {e.strerror}") from None
        finally:
            os.umask(old)
        self.listener.listen(1)
        self.listener.setblocking(False)
        self.client: socket.socket | None = None
        self.pending = bytearray()
        self.io: Any = None

    def start(self, io: Any) -> None:
        self.io = io
        io.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.client is not None:
            conn.close()                          # one client at a time
            return
        conn.setblocking(False)
        self.client = conn
        self.io.add_reader(conn.fileno(), self._readable)
        if self.pending:
            data, self.pending = bytes(self.pending), bytearray()
            self.write(data)

    def _readable(self) -> None:
        c = self.client
        if c is None:
            return
        try:
            data = c.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.io.remove_reader(c.fileno())
            c.close()
            self.client = None
            return
        self.on_input(data)

    def write(self, data: bytes) -> None:
        if self.client is None:
            self.pending += data
            del self.pending[:max(0, len(self.pending) - self.KEEP)]
            return
        try:
            self.client.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        if self.io is not None:
            if self.client is not None:
                self.io.remove_reader(self.client.fileno())
            self.io.remove_reader(self.listener.fileno())
        if self.client is not None:
            self.client.close()
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class ConsoleCore:
    """A serial port without a transport: output to the backend, input into a bounded
    backlog until the guest has buffers (beyond it, bytes are dropped and counted)."""

    def __init__(self, backend: CharBackend, backlog: int = 1 << 20):
        self.backend = backend
        self.backlog = bytearray()
        self.backlog_max = backlog
        self.out_bytes = self.in_bytes = self.in_dropped = 0
        self.on_rx: Callable[[], None] = lambda: None
        backend.attach(self.input)

    def output(self, data: bytes | memoryview) -> None:
        self.out_bytes += len(data)
        self.backend.write(data)

    def input(self, data: bytes) -> None:
        room = self.backlog_max - len(self.backlog)
        if len(data) > room:
            self.in_dropped += len(data) - room
            data = data[:room]
        if data:
            self.in_bytes += len(data)
            self.backlog += data
            self.on_rx()


def open_char(spec: str) -> CharBackend:
    """`file:PATH`, `pty` or `socket:PATH`."""
    if spec == "pty":
        return PtyChar()
    if spec.startswith("file:"):
        return FileChar(spec[5:])
    if spec.startswith("socket:"):
        return SocketChar(spec[7:])
    raise ConfigError(f"console {spec}: expected file:PATH, pty or socket:PATH")
