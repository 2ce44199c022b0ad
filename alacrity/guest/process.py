"""Process guests: the guest is a second Python process.

It receives the RAM memfds and the doorbell and interrupt eventfds (SCM_RIGHTS) and a
control socket. Register accesses travel on the control socket as
(read|write, space, size, addr, value) and are answered like a vCPU exit; a write to an
address registered as a doorbell goes straight to its eventfd, never to the socket.

Host side: `ProcessGuest`. Guest side: `GuestMachine` and `main()` (run as
`python -m alacrity.guest.process FD`).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable

from alacrity.bus import Space
from alacrity.guest.access import GuestAccess
from alacrity.memory import Allocator, GuestMemory, RegionInfo

log = logging.getLogger("alacrity.guest")

K_READ = 1
K_WRITE = 2
K_JSON = 3
ACCESS = struct.Struct("<BBBxxxxxQQ")   # kind, space, size, addr, value
REPLY = struct.Struct("<Q")
MAX_MSG = 1 << 20
GUEST_RAM_START = 1 << 20               # the guest allocates above 1 MiB
EXIT_SPINS = 200                        # non-blocking polls (~0.5 us each) before sleeping


class GuestDied(RuntimeError):
    """The guest process ended before it reported a result."""


# ---------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------
class ProcessGuest:
    def __init__(self, machine: Any):
        self.machine = machine
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self._done = threading.Event()
        self.on_mark: Callable[[str, dict[str, Any]], None] = lambda name, data: None
        self.exits = 0
        self._stderr = tempfile.TemporaryFile()

    def start(self, entry: str, args: dict[str, Any],
              extra_fds: list[int] | None = None) -> "ProcessGuest":
        """Boot a guest that runs `entry` ("module:function") with `args`; `extra_fds`
        reach the guest as `machine.extra_fds` (benchmarks pass their own eventfds)."""
        host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env.setdefault("PYTHONHASHSEED", "0")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "alacrity.guest.process", str(child.fileno())],
            pass_fds=[child.fileno()], stderr=self._stderr, env=env)
        child.close()
        desc, fds = self.machine.describe()
        desc["entry"] = entry
        desc["args"] = args
        desc["extra_fds"] = list(range(len(fds), len(fds) + len(extra_fds or [])))
        fds = fds + list(extra_fds or [])
        socket.send_fds(host, [json.dumps(desc).encode()], fds)
        host.setblocking(False)
        self.sock = host
        self.machine.io.add_reader(host.fileno(), self._on_control)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # -- control socket, on the I/O thread ----------------------------------------------
    def _on_control(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            data = sock.recv(MAX_MSG)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._ended("the guest closed its control socket")
            return
        kind = data[0]
        try:
            if kind in (K_READ, K_WRITE):
                if len(data) != ACCESS.size:
                    raise ValueError(f"access message of {len(data)} bytes")
                _, space, size, addr, value = ACCESS.unpack(data)
                if size not in (1, 2, 4, 8):
                    raise ValueError(f"access of {size} bytes")
                self.exits += 1
                bus = self.machine.bus
                if kind == K_READ:
                    value = bus.read(Space(space), addr, size)
                else:
                    bus.write(Space(space), addr, size, value)
                    value = 0
                sock.send(REPLY.pack(value & 0xFFFFFFFFFFFFFFFF))
            elif kind == K_JSON:
                msg = json.loads(data[1:])
                self._on_json(msg)
            else:
                raise ValueError(f"unknown message kind {kind}")
        except (ValueError, KeyError, TypeError) as e:
            log.error("process guest %s: bad control message (%s); stopping it",
                      self.proc.pid if self.proc else "?", e)
            self.kill()
            self._ended(f"bad control message: {e}")

    def _on_json(self, msg: dict[str, Any]) -> None:
        t = msg["type"]
        assert self.sock is not None
        if t == "mark":
            self.on_mark(str(msg["name"]), dict(msg.get("data") or {}))
            self.sock.send(REPLY.pack(0))
        elif t == "result":
            if msg.get("ok"):
                self.result = msg["data"]
            else:
                self.error = msg.get("error", "guest failed")
            self.sock.send(REPLY.pack(0))
        elif t == "log":
            log.info("guest: %s", msg.get("text", ""))
        else:
            raise ValueError(f"unknown control message {t!r}")

    def _ended(self, why: str) -> None:
        if self.sock is not None:
            self.machine.io.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        if self.result is None and self.error is None:
            self.error = why
            # the guest went away in the middle of things: reset its devices, as a VMM
            # resets a VM's devices, so the machine can take another guest
            log.warning("process guest %s: %s; resetting its devices",
                        self.proc.pid if self.proc else "?", why)
            self.machine.reset()
        self._done.set()

    # -- waiting -------------------------------------------------------------------------
    def wait(self, timeout: float | None = None,
             tick: Callable[[], None] | None = None) -> dict[str, Any]:
        """The guest's result; GuestDied if it ended without one or failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.wait(0.1):
            if tick:
                tick()
            if self.proc is not None and self.proc.poll() is not None:
                # the socket EOF may still be in flight; give the I/O thread a moment
                if not self._done.wait(1.0):
                    self.machine.io.call_sync(lambda: self._ended("the guest process exited"))
                break
            if deadline is not None and time.monotonic() > deadline:
                self.kill()
                raise GuestDied(f"guest did not finish within {timeout:.0f} s; killed it")
        assert self.proc is not None
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        if self.result is not None and code == 0:
            return self.result
        raise GuestDied(self._death_message(code))

    def _death_message(self, code: int) -> str:
        how = (f"killed by signal {signal.Signals(-code).name}" if code < 0
               else f"exited with code {code}")
        msg = f"guest process {self.pid} {how}"
        if self.error and self.result is None:
            msg += f": {self.error.strip().splitlines()[-1]}"
        tail = self.stderr_tail()
        if tail:
            msg += f"\n--- guest stderr ---\n{tail}"
        return msg

    def stderr_tail(self, limit: int = 4000) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-limit:].strip()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def close(self) -> None:
        self.kill()
        if self.proc is not None:
            self.proc.wait()
        if self.sock is not None:
            self.machine.io.call_sync(lambda: self._ended("closed"))
        self._stderr.close()


# ---------------------------------------------------------------------------------------
# guest side
# ---------------------------------------------------------------------------------------
class GuestMachine(GuestAccess):
    """The machine as a process guest sees it: exits travel on the control socket."""

    def __init__(self, sock: socket.socket, boot: dict[str, Any], fds: list[int]):
        super().__init__()
        self.sock = sock
        self.mem = GuestMemory.from_fds(
            [RegionInfo(r["gpa"], r["size"], fds[r["fd"]], r["offset"]) for r in boot["ram"]])
        top = max(r["gpa"] + r["size"] for r in boot["ram"])
        self.alloc = Allocator(GUEST_RAM_START, top)
        for ev in boot["ioeventfds"]:
            self.add_doorbell(ev["space"], ev["addr"], ev["size"], ev["datamatch"], fds[ev["fd"]])
        self.devices = boot["devices"]
        for d in self.devices:
            d["irq_fd"] = fds[d["irq_fd"]]
        self.extra_fds = [fds[i] for i in boot.get("extra_fds", [])]

    def _reply(self) -> bytes:
        """Wait for the host's answer to an exit. A vCPU in an exit is not halted, so
        spin briefly before sleeping: the exit then costs one host wake-up, not two."""
        recv = self.sock.recv
        for _ in range(EXIT_SPINS):
            try:
                return recv(REPLY.size, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
        return recv(REPLY.size)

    def _exit_read(self, space: int, addr: int, size: int) -> int:
        self.sock.send(ACCESS.pack(K_READ, space, size, addr, 0))
        return REPLY.unpack(self._reply())[0]

    def _exit_write(self, space: int, addr: int, size: int, value: int) -> None:
        self.sock.send(ACCESS.pack(K_WRITE, space, size, addr, value))
        self._reply()

    def _send_json(self, msg: dict[str, Any]) -> None:
        self.sock.send(bytes([K_JSON]) + json.dumps(msg).encode())
        self.sock.recv(REPLY.size)

    def mark(self, name: str, **data: Any) -> None:
        """Tell the host a measurement point was reached (it snapshots its counters)."""
        self._send_json({"type": "mark", "name": name, "data": data})

    def log(self, text: str) -> None:
        self.sock.send(bytes([K_JSON]) + json.dumps({"type": "log", "text": text}).encode())

    def finish(self, ok: bool, data: Any = None, error: str = "") -> None:
        self._send_json({"type": "result", "ok": ok, "data": data, "error": error})


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    msg, fds, _, _ = socket.recv_fds(sock, MAX_MSG, 256)
    if not msg:
        return 1
    boot = json.loads(msg)
    machine = GuestMachine(sock, boot, fds)
    module, _, func = boot["entry"].partition(":")
    try:
        fn = getattr(importlib.import_module(module), func)
        result = fn(machine, boot["args"])
    except Exception:
        machine.finish(False, error=traceback.format_exc())
        traceback.print_exc()
        return 1
    machine.finish(True, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
