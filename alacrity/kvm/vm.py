"""A KVM VM on a `Machine`: the same memfd RAM the devices use, PIO and MMIO exits
dispatched to the same `Bus` (on the machine's I/O thread, as process-guest exits are),
every doorbell registered with KVM_IOEVENTFD so it never leaves the kernel, and vCPU
threads running KVM_RUN without the GIL.

The guest enters 64-bit mode directly (no firmware): the VMM writes a GDT, a TSS with an
I/O permission bitmap, identity-mapped page tables (2 MiB pages, U=1) and the payload, and
sets the registers. On PVM hosts (`api.pvm_host()`), where CPL0 guest code is emulated one
instruction at a time, the payload runs at CPL3 and polls; the result records the mode.

Guest-physical layout (low memory is the VMM's):
  0x1000 GDT  0x2000 TSS (+ I/O bitmap)  0x8000 page tables  0xE000 mailbox
  0x10000.. vCPU stacks  0x100000 payload  0x400000.. heap (rings, buffers)
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import struct
import threading
from dataclasses import dataclass
from typing import Any, Callable

from alacrity.bus import Space
from alacrity.kvm import api
from alacrity.machine import Machine

log = logging.getLogger("alacrity.kvm")

GDT, TSS, PML4, MAILBOX = 0x1000, 0x2000, 0x8000, 0xE000
STACKS, STACK_SIZE = 0x10000, 0x10000
PAYLOAD, HEAP = 0x100000, 0x400000
SERIAL, EXIT_PORT, MARK_PORT = 0x3F8, 0xF4, 0xF5
MARKS = {1: "start", 2: "end"}
HIST, HIST_BUCKETS, HIST_BUCKET_NS = 0x80000, 8192, 100   # payload/bench.h
MAP_GIB = 4                              # identity map 0..4 GiB (RAM and the MMIO windows)
MAILBOX_MAGIC = 0x4B414C41
MAX_DEVICES = 8
DEV_VIRTIO_MMIO, DEV_VBUS_BRIDGE = 1, 2
TESTS = {"selftest": 1, "hostile": 2, "spin": 3, "fault": 4, "pattern": 5, "bench-blk": 6,
         "bench-net": 7, "limit-shm": 8}

# struct mailbox of payload/rt.h
MB_HEAD = struct.Struct("<IIII")
MB_DEVICE = struct.Struct("<IIQ")
MB_OFF_DEVICES = MB_HEAD.size
MB_OFF_HEAP = MB_OFF_DEVICES + MB_DEVICE.size * MAX_DEVICES
MB_OFF_TSC = MB_OFF_HEAP + 16
MB_OFF_ARGS = MB_OFF_TSC + 8
MB_OFF_RESULTS = MB_OFF_ARGS + 8 * 8
MB_OFF_STATUS = MB_OFF_RESULTS + 16 * 8
MB_OFF_MESSAGE = MB_OFF_STATUS + 8
MB_OFF_GSI = MB_OFF_MESSAGE + 256

# segment descriptors (flat): kernel code 0x08, kernel data 0x10, user code 0x18|3,
# user data 0x20|3, TSS 0x28 (16 bytes)
GDT_ENTRIES = [0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00AFFA000000FFFF,
               0x00CFF2000000FFFF]
TSS_LIMIT = 104 + 8192                   # header, then one bit per port (0: allowed), then 0xFF


def payload_devices(machine: Machine) -> list[Any]:
    """The machine's devices the payload is told about, in mailbox order."""
    return [s for s in machine.slots if s.kind in ("virtio-mmio", "vbus-bridge")][:MAX_DEVICES]


class GuestFailed(RuntimeError):
    """The guest stopped in a way the VMM cannot continue from (the message names the exit
    reason and RIP)."""


@dataclass
class RunResult:
    status: int                          # what the payload reported on the exit port
    console: str
    cpl: int
    mode: str                            # "cpl3-poll" (PVM) or "cpl0-irq" (VMX/SVM)
    exits: int                           # userspace exits from KVM_RUN
    mailbox: bytes


def tsc_khz() -> int:
    """The host's TSC rate, for the payload's timeouts (the TSC is not virtualised here)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/tsc_freq_khz") as f:
            return int(f.read())
    except OSError:
        pass
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return 2_000_000


class KvmVm:
    """One VM with one vCPU (the payload's programs are single-threaded)."""

    def __init__(self, machine: Machine, *, user_mode: bool | None = None):
        self.machine = machine
        if user_mode is None:
            # ALACRITY_KVM_MODE=cpl0|cpl3 overrides the choice (tests, experiments)
            forced = os.environ.get("ALACRITY_KVM_MODE", "")
            user_mode = {"cpl0": False, "cpl3": True}.get(forced, api.pvm_host())
        self.user_mode = user_mode
        self.kvm = api.open_kvm()
        self.fds: list[int] = []
        try:
            self.vm = api.ioctl(self.kvm, api.CREATE_VM, 0)
            self.fds.append(self.vm)
            for slot, r in enumerate(machine.mem.regions):
                addr = ctypes.addressof(ctypes.c_char.from_buffer(r.mv))
                api.ioctl(self.vm, api.SET_USER_MEMORY_REGION, api.UserspaceMemoryRegion(
                    slot=slot, flags=0, guest_phys_addr=r.gpa, memory_size=r.size,
                    userspace_addr=addr))
            # doorbells stay in the kernel: the same eventfds the I/O thread reads
            for ev in machine.bus.ioeventfds:
                flags = (api.IOEVENTFD_FLAG_PIO if ev.space == Space.PIO else 0)
                if ev.datamatch is not None:
                    flags |= api.IOEVENTFD_FLAG_DATAMATCH
                api.ioctl(self.vm, api.IOEVENTFD, api.IoEventFd(
                    datamatch=ev.datamatch or 0, addr=ev.addr, len=ev.size, fd=ev.fd,
                    flags=flags))
            if not self.user_mode:
                # CPL0 mode takes interrupts: the in-kernel PIC/IOAPIC/LAPIC, and each
                # device's interrupt eventfd wired to its GSI (an IOAPIC pin) by irqfd
                api.ioctl(self.vm, api.CREATE_IRQCHIP, 0)
                for slot in payload_devices(machine):
                    api.ioctl(self.vm, api.IRQFD, api.IrqFd(fd=slot.irq.fd, gsi=slot.irq.gsi))
            self.vcpu = api.ioctl(self.vm, api.CREATE_VCPU, 0)
            self.fds.append(self.vcpu)
            self.run_mm, self.run = api.map_run(self.kvm, self.vcpu)
        except BaseException:
            self.close()
            raise
        self.exits = 0
        self.on_mark: Callable[[str], None] = lambda name: None   # the payload's MARK_PORT
        self.console = bytearray()
        self._tid: int | None = None
        self._stop_reason = ""

    def close(self) -> None:
        run = getattr(self, "run", None)
        if run is not None:
            del self.run
            self.run_mm.close()
        for fd in reversed(self.fds):
            os.close(fd)
        self.fds.clear()
        if self.kvm >= 0:
            os.close(self.kvm)
            self.kvm = -1

    # -- building the guest --------------------------------------------------------------
    def _write_tables(self, payload: bytes) -> None:
        mem = self.machine.mem
        if PAYLOAD + len(payload) > HEAP or mem.regions[0].size < HEAP + (1 << 20):
            raise ValueError("guest RAM too small for the payload")
        gdt = b"".join(struct.pack("<Q", e) for e in GDT_ENTRIES)
        tss_desc_lo = ((TSS_LIMIT & 0xFFFF) | ((TSS & 0xFFFFFF) << 16) | (0x89 << 40)
                       | (((TSS_LIMIT >> 16) & 0xF) << 48) | (((TSS >> 24) & 0xFF) << 56))
        gdt += struct.pack("<QQ", tss_desc_lo, TSS >> 32)
        mem.write(GDT, gdt)
        # TSS: RSP0 (interrupt entry from CPL3) and the I/O bitmap right after the header
        tss = bytearray(TSS_LIMIT + 1)
        struct.pack_into("<Q", tss, 4, STACKS + STACK_SIZE - 16)
        struct.pack_into("<H", tss, 0x66, 104)
        tss[-1] = 0xFF
        mem.write(TSS, bytes(tss))
        # page tables: PML4 -> one PDPT -> MAP_GIB page directories of 2 MiB pages, U=1
        pdpt = PML4 + 0x1000
        mem.write(PML4, struct.pack("<Q", pdpt | 0x7))
        for g in range(MAP_GIB):
            pd = pdpt + 0x1000 * (1 + g)
            mem.write(pdpt + 8 * g, struct.pack("<Q", pd | 0x7))
            mem.write(pd, b"".join(struct.pack("<Q", ((g << 30) + (i << 21)) | 0x87)
                                   for i in range(512)))
        # the payload's .bss is not in the binary: zero its whole area (a VM booted
        # earlier on the same machine left its own image there)
        mem.write(PAYLOAD, bytes(HEAP - PAYLOAD))
        mem.write(PAYLOAD, payload)

    def _write_mailbox(self, test: str, args: list[int], flags: int) -> None:
        """flags: bit 0 packed rings, bit 1 EVENT_IDX (payload/rt.h)."""
        mem = self.machine.mem
        devs = payload_devices(self.machine)
        heap_size = mem.regions[0].size - HEAP
        mb = bytearray(4096)
        MB_HEAD.pack_into(mb, 0, MAILBOX_MAGIC, TESTS[test], len(devs), flags)
        for i, s in enumerate(devs):
            if s.kind == "vbus-bridge":
                MB_DEVICE.pack_into(mb, MB_OFF_DEVICES + MB_DEVICE.size * i, DEV_VBUS_BRIDGE,
                                    s.extra["pio"], s.base)
            else:
                MB_DEVICE.pack_into(mb, MB_OFF_DEVICES + MB_DEVICE.size * i, DEV_VIRTIO_MMIO,
                                    s.device.model.device_id, s.base)
        struct.pack_into("<QQQ", mb, MB_OFF_HEAP, HEAP, heap_size, tsc_khz())
        struct.pack_into("<8Q", mb, MB_OFF_ARGS, *(list(args) + [0] * 8)[:8])
        for i, s in enumerate(devs):
            mb[MB_OFF_GSI + i] = s.irq.gsi
        mem.write(MAILBOX, bytes(mb))

    def _set_registers(self) -> None:
        s = api.Sregs()
        api.ioctl(self.vcpu, api.GET_SREGS, s)
        user = self.user_mode
        dpl = 3 if user else 0

        def seg(sel: int, code: bool) -> api.Segment:
            return api.Segment(base=0, limit=0xFFFFFFFF, selector=sel | dpl,
                               type=11 if code else 3, present=1, dpl=dpl, db=0 if code else 1,
                               s=1, l=1 if code else 0, g=1)

        s.cs = seg(0x18 if user else 0x08, True)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(s, name, seg(0x20 if user else 0x10, False))
        s.tr = api.Segment(base=TSS, limit=TSS_LIMIT, selector=0x28, type=11, present=1,
                           s=0, g=0)
        s.gdt = api.DTable(base=GDT, limit=len(GDT_ENTRIES) * 8 + 16 - 1)
        s.idt = api.DTable(base=0, limit=0)
        s.cr0 = 0x80050033                   # PG | AM | WP | NE | ET | MP | PE
        s.cr3 = PML4
        s.cr4 = 0x20                         # PAE
        s.efer = 0x500                       # LME | LMA
        api.ioctl(self.vcpu, api.SET_SREGS, s)
        r = api.Regs()
        r.rip = PAYLOAD
        r.rsp = STACKS + STACK_SIZE - 8      # as after a call: aligned for the C ABI
        r.rdi = MAILBOX
        r.rflags = 0x2                       # interrupts off (CPL0 mode turns them on)
        api.ioctl(self.vcpu, api.SET_REGS, r)

    # -- running ------------------------------------------------------------------------------
    def boot(self, payload: bytes, test: str = "selftest", args: list[int] | None = None,
             *, flags: int = 0, deadline: float = 60.0) -> RunResult:
        """Run the payload's `test` until it reports on the exit port; raises GuestFailed
        on a triple fault, an emulation failure or the deadline."""
        self._write_tables(payload)
        if not self.user_mode:
            flags |= 4                       # interrupts and hlt (payload/rt.h)
        self._write_mailbox(test, args or [], flags)
        self._set_registers()
        result: dict[str, Any] = {}
        th = threading.Thread(target=self._vcpu_loop, args=(result,), name="alacrity-vcpu0",
                              daemon=True)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, lambda *_: None)   # EINTR for KVM_RUN, no more
        th.start()
        th.join(deadline)
        if th.is_alive():
            self._stop_reason = f"still running after the {deadline:.0f} s deadline"
            self.run.immediate_exit = 1
            while th.is_alive():
                if self._tid is not None:
                    signal.pthread_kill(self._tid, signal.SIGUSR1)
                th.join(0.05)
        if "error" in result:
            raise result["error"]
        mb = self.machine.mem.read(MAILBOX, 4096)
        cpl = struct.unpack_from("<I", mb, MB_OFF_STATUS + 4)[0]
        return RunResult(result["status"], self.console.decode(errors="replace"), cpl,
                         "cpl3-poll" if self.user_mode else "cpl0-irq", self.exits, mb)

    def _regs_rip(self) -> int:
        r = api.Regs()
        try:
            api.ioctl(self.vcpu, api.GET_REGS, r)
        except OSError:
            return -1
        return r.rip

    def _vcpu_loop(self, result: dict[str, Any]) -> None:
        self._tid = threading.get_ident()      # a pthread_t, for signal.pthread_kill
        run = self.run
        bus = self.machine.bus
        call = self.machine.io.call_sync
        mm = self.run_mm
        try:
            while True:
                rc = api.run(self.vcpu)
                if rc < 0:
                    if -rc == 4 and self._stop_reason:       # EINTR: the watchdog
                        raise GuestFailed(f"guest stopped: {self._stop_reason} "
                                          f"(RIP {self._regs_rip():#x})")
                    if -rc in (4, 11):
                        continue
                    raise GuestFailed(f"KVM_RUN: {os.strerror(-rc)}")
                self.exits += 1
                reason = run.exit_reason
                if reason == api.EXIT_IO:
                    io = run.exit.io
                    size, port = io.size, io.port
                    for k in range(io.count):
                        at = io.data_offset + k * size
                        if io.direction == api.IO_OUT:
                            value = int.from_bytes(mm[at:at + size], "little")
                            if port == SERIAL:
                                self.console.append(value & 0xFF)
                            elif port == EXIT_PORT:
                                result["status"] = value - (1 << 32) if value >> 31 else value
                                return
                            elif port == MARK_PORT:
                                self.on_mark(MARKS.get(value, str(value)))
                            else:
                                call(lambda p=port, s=size, v=value: bus.write(Space.PIO, p, s, v))
                        else:
                            v = 0 if port in (SERIAL + 5,) else int(call(
                                lambda p=port, s=size: bus.read(Space.PIO, p, s)))  # type: ignore[arg-type]
                            if port == SERIAL + 5:
                                v = 0x60                             # transmitter empty
                            mm[at:at + size] = v.to_bytes(size, "little")
                elif reason == api.EXIT_MMIO:
                    m = run.exit.mmio
                    addr, n = m.phys_addr, m.len
                    if m.is_write:
                        value = int.from_bytes(bytes(m.data)[:n], "little")
                        call(lambda: bus.write(Space.MMIO, addr, n, value))
                    else:
                        v = int(call(lambda: bus.read(Space.MMIO, addr, n)))  # type: ignore[arg-type]
                        ctypes.memmove(m.data, v.to_bytes(8, "little"), 8)
                elif reason in (api.EXIT_INTR,):
                    continue
                else:
                    name = api.EXIT_NAMES.get(reason, str(reason))
                    what = {api.EXIT_SHUTDOWN: "triple fault (shutdown)",
                            api.EXIT_FAIL_ENTRY: "the CPU refused to enter the guest",
                            api.EXIT_INTERNAL_ERROR: f"emulation failure (suberror "
                                                     f"{run.exit.internal.suberror})",
                            api.EXIT_HLT: "hlt with nothing to wake it"}.get(reason, "")
                    raise GuestFailed(f"guest stopped: exit {name}{': ' + what if what else ''}"
                                      f" at RIP {self._regs_rip():#x}")
        except BaseException as e:          # handed to boot()
            result["error"] = e


def histogram(mem: Any) -> list[int]:
    """The payload's latency histogram (HIST_BUCKET_NS buckets; the last one is overflow)."""
    return list(memoryview(mem.read(HIST, 4 * HIST_BUCKETS)).cast("I"))


def device_results(r: RunResult, machine: Machine) -> list[dict[str, Any]]:
    """Per virtio-mmio device: what the payload reported (ops, errors) and the device's
    own view (broken or not)."""
    out = []
    for i, s in enumerate(payload_devices(machine)):
        ops, errors = struct.unpack_from("<QQ", r.mailbox, MB_OFF_RESULTS + 16 * i)
        dev = s.device
        kind = dev.model.name if s.kind == "virtio-mmio" else "vbus"
        out.append({"device": s.name, "kind": kind, "ops": ops, "errors": errors,
                    "broken": dev.broken, "ok": bool(ops) and not errors and not dev.broken})
    return out


def run_selftest(machine: Machine, *, sectors: int = 64, deadline: float = 60.0,
                 test: str = "selftest", seed: int = 0, packed: bool = False,
                 user_mode: bool | None = None) -> tuple[RunResult, list[dict[str, Any]]]:
    """Boot the payload on `machine` and run its self-test (or the `pattern` data check),
    on split rings or, with `packed`, packed ones (EVENT_IDX negotiated either way)."""
    from alacrity.kvm.payload.build import build

    supported = {"virtio-blk", "virtio-net", "vbus-bridge"}
    for s in machine.slots:
        name = getattr(getattr(s.device, "model", None), "name", s.kind)
        if name not in supported:
            raise NotImplementedError(f"{name} has no driver in the KVM payload yet "
                                      f"(have: {', '.join(sorted(supported))})")
    vm = KvmVm(machine, user_mode=user_mode)
    try:
        r = vm.boot(build(), test, [seed, 0, sectors], flags=2 | int(packed),
                    deadline=deadline)
    finally:
        vm.close()
    return r, device_results(r, machine)
