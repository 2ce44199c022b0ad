"""virtio-console (file, pty, unix socket) and virtio-rng: bytes in equal bytes out."""

import os
import select
import socket
import time

import pytest

from alacrity.devices.console import ConsoleCore, FileChar, PtyChar, SocketChar, open_char
from alacrity.errors import ConfigError
from alacrity.guest.drivers.virtio_console import VirtioConsoleDriver
from alacrity.guest.drivers.virtio_rng import VirtioRngDriver
from alacrity.guest.local import LocalGuest
from alacrity.guest.programs import find_device
from alacrity.machine import Machine
from alacrity.virtio import spec
from alacrity.virtio.console import VirtioConsole
from alacrity.virtio.rng import MAX_FILL, VirtioRng


def console_machine(backend, packed=False):
    m = Machine(16 << 20)
    m.attach(backend)
    core = ConsoleCore(backend)
    m.add_virtio_mmio(VirtioConsole(core))
    g = LocalGuest(m)
    return m, core, VirtioConsoleDriver(find_device(g, spec.ID_CONSOLE), packed=packed)


def recv_exactly(sock, n, timeout=10):
    out = b""
    end = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < end:
        if select.select([sock], [], [], 0.5)[0]:
            out += sock.recv(n - len(out))
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_console_over_a_unix_socket(tmp_path, packed):
    path = str(tmp_path / "console.sock")
    m, core, drv = console_machine(SocketChar(path), packed)
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        drv.write(b"before anyone listens\n")         # kept until a client connects
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        assert recv_exactly(c, 22) == b"before anyone listens\n"
        out = os.urandom(20000)
        drv.write(out)
        assert recv_exactly(c, len(out)) == out
        inp = os.urandom(50000)
        c.sendall(inp)
        assert drv.read(len(inp)) == inp
        c.close()
    finally:
        m.close()


def test_console_over_a_pty():
    backend = PtyChar()
    m, core, drv = console_machine(backend)
    try:
        slave = os.open(backend.path, os.O_RDWR | os.O_NOCTTY)
        drv.write(b"hello pty\n")
        got = b""
        while len(got) < 10 and select.select([slave], [], [], 5)[0]:
            got += os.read(slave, 100)
        assert got == b"hello pty\n"
        data = bytes(range(256)) * 4
        os.write(slave, data)
        assert drv.read(len(data)) == data
        os.close(slave)
    finally:
        m.close()


def test_console_to_a_file_and_emergency_write(tmp_path):
    path = tmp_path / "console.log"
    m, core, drv = console_machine(FileChar(str(path)))
    try:
        assert drv.t.has(2)                           # VIRTIO_CONSOLE_F_EMERG_WRITE
        drv.write(b"line one\n")
        drv.emergency_write(ord("!"))
        assert path.read_bytes() == b"line one\n!"
        assert drv.read(1, timeout=0.2) == b""       # a file gives no input
    finally:
        m.close()


def test_console_backend_errors(tmp_path):
    with pytest.raises(ConfigError):
        open_char("serial:/dev/ttyS0")
    with pytest.raises(ConfigError):
        FileChar(str(tmp_path / "no" / "such" / "dir" / "log"))
    notsock = tmp_path / "plain"
    notsock.write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        SocketChar(str(notsock))


@pytest.mark.parametrize("packed", [False, True])
def test_rng_returns_the_requested_length(packed):
    m = Machine(16 << 20)
    dev = m.add_virtio_mmio(VirtioRng())
    try:
        drv = VirtioRngDriver(find_device(LocalGuest(m), spec.ID_RNG), packed=packed)
        for n in (1, 16, 4096, 10000):
            assert len(drv.read(n)) == n
        a, b = drv.read(64), drv.read(64)
        assert a != b and len(set(a)) > 20            # 64 random bytes: many distinct values
        assert dev.model.bytes_out >= 1 + 16 + 4096 + 10000 + 128
    finally:
        m.close()


def test_rng_bounds_each_request():
    from alacrity.memory import GuestMemory
    from alacrity.virtio.chain import Chain
    mem = GuestMemory.create([(0, 4 << 20)])
    rng = VirtioRng()
    big = mem.view(0, 1 << 20)
    assert rng.handle(Chain(0, [], [big], 0, 1 << 20)) == MAX_FILL
    assert rng.handle(Chain(0, [], [], 0, 0)) == 0
    del big
    mem.close()
