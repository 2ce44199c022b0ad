"""The KVM API we use, through ctypes (linux/kvm.h, x86-64). Every ioctl is checked and a
failure names it: `KvmError("KVM_SET_USER_MEMORY_REGION: Invalid argument")`.

KVM_RUN goes through libc's ioctl (ctypes releases the GIL, so vCPU threads run in
parallel, and an EINTR comes back to us instead of being retried: that is how a watchdog
stops a guest that never exits)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from typing import Any

KVMIO = 0xAE
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _iow(nr: int, struct: Any) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _ior(nr: int, struct: Any) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class Regs(ctypes.Structure):
    _fields_ = [(n, u64) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                                   "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
                                   "rip", "rflags")]


class Segment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8),
                ("avl", u8), ("unusable", u8), ("padding", u8)]


class DTable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = [("cs", Segment), ("ds", Segment), ("es", Segment), ("fs", Segment),
                ("gs", Segment), ("ss", Segment), ("tr", Segment), ("ldt", Segment),
                ("gdt", DTable), ("idt", DTable), ("cr0", u64), ("cr2", u64), ("cr3", u64),
                ("cr4", u64), ("cr8", u64), ("efer", u64), ("apic_base", u64),
                ("interrupt_bitmap", u64 * 4)]


class IoEventFd(ctypes.Structure):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", ctypes.c_int32),
                ("flags", u32), ("pad", u8 * 36)]


class IrqFd(ctypes.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32),
                ("pad", u8 * 16)]


class IrqLevel(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class Msi(ctypes.Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("flags", u32),
                ("devid", u32), ("pad", u8 * 12)]


class RoutingIrqchip(ctypes.Structure):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class RoutingMsi(ctypes.Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class RoutingUnion(ctypes.Union):
    _fields_ = [("irqchip", RoutingIrqchip), ("msi", RoutingMsi), ("pad", u32 * 8)]


class RoutingEntry(ctypes.Structure):
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", RoutingUnion)]


class RoutingHeader(ctypes.Structure):
    _fields_ = [("nr", u32), ("flags", u32)]


class PitConfig(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


# -- the shared kvm_run page ----------------------------------------------------------------
class RunIo(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class RunMmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class RunFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class RunInternal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class RunSystemEvent(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class RunExit(ctypes.Union):
    _fields_ = [("io", RunIo), ("mmio", RunMmio), ("fail_entry", RunFailEntry),
                ("internal", RunInternal), ("system_event", RunSystemEvent),
                ("pad", ctypes.c_char * 256)]


class Run(ctypes.Structure):
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("exit", RunExit)]


GET_API_VERSION = _io(0x00)
CREATE_VM = _io(0x01)
CHECK_EXTENSION = _io(0x03)
GET_VCPU_MMAP_SIZE = _io(0x04)
CREATE_VCPU = _io(0x41)
SET_USER_MEMORY_REGION = _iow(0x46, UserspaceMemoryRegion)
SET_TSS_ADDR = _io(0x47)
CREATE_IRQCHIP = _io(0x60)
IRQ_LINE = _iow(0x61, IrqLevel)
SET_GSI_ROUTING = _iow(0x6A, RoutingHeader)
IRQFD = _iow(0x76, IrqFd)
CREATE_PIT2 = _iow(0x77, PitConfig)
IOEVENTFD = _iow(0x79, IoEventFd)
RUN = _io(0x80)
GET_REGS = _ior(0x81, Regs)
SET_REGS = _iow(0x82, Regs)
GET_SREGS = _ior(0x83, Sregs)
SET_SREGS = _iow(0x84, Sregs)
SIGNAL_MSI = _iow(0xA5, Msi)

NAMES = {v: k for k, v in list(globals().items())
         if k.isupper() and isinstance(v, int) and k not in ("KVMIO",) and not k.startswith("_")}

# capabilities (KVM_CHECK_EXTENSION)
CAP_IRQCHIP = 0
CAP_USER_MEMORY = 3
CAP_IOEVENTFD = 36
CAP_IRQFD = 32
CAP_SIGNAL_MSI = 77
CAP_IMMEDIATE_EXIT = 136

# exit reasons
EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT",
              6: "MMIO", 7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR",
              17: "INTERNAL_ERROR", 24: "SYSTEM_EVENT"}
EXIT_IO, EXIT_HLT, EXIT_MMIO, EXIT_SHUTDOWN, EXIT_FAIL_ENTRY, EXIT_INTR = 2, 5, 6, 8, 9, 10
EXIT_INTERNAL_ERROR, EXIT_SYSTEM_EVENT = 17, 24
IO_IN, IO_OUT = 0, 1

IOEVENTFD_FLAG_DATAMATCH = 1 << 0
IOEVENTFD_FLAG_PIO = 1 << 1
MEM_LOG_DIRTY_PAGES = 1 << 0
IRQ_ROUTING_IRQCHIP = 1
IRQ_ROUTING_MSI = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class KvmError(OSError):
    """A KVM ioctl failed; the message names it."""


def ioctl(fd: int, request: int, arg: Any = 0) -> int:
    """A checked ioctl: an int or a ctypes structure (passed by reference)."""
    try:
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        return fcntl.ioctl(fd, request, arg, True)        # type: ignore[call-overload]
    except OSError as e:
        name = "KVM_" + NAMES.get(request, f"ioctl {request:#x}")
        raise KvmError(e.errno, f"{name}: {os.strerror(e.errno or 0)}") from None


def run(vcpu_fd: int) -> int:
    """KVM_RUN without the GIL; returns 0, or -errno (EINTR: a signal asked us to stop)."""
    r = _libc.ioctl(vcpu_fd, RUN, None)
    if r < 0:
        return -ctypes.get_errno()
    return r


def set_gsi_routing(vm_fd: int, entries: list[RoutingEntry]) -> None:
    """KVM_SET_GSI_ROUTING: the whole table at once (a header, then the entries)."""
    buf = (ctypes.c_char * (ctypes.sizeof(RoutingHeader)
                            + ctypes.sizeof(RoutingEntry) * len(entries)))()
    RoutingHeader.from_buffer(buf).nr = len(entries)
    for i, e in enumerate(entries):
        ctypes.memmove(ctypes.addressof(buf) + ctypes.sizeof(RoutingHeader)
                       + i * ctypes.sizeof(RoutingEntry), ctypes.addressof(e),
                       ctypes.sizeof(RoutingEntry))
    ioctl(vm_fd, SET_GSI_ROUTING, buf)


def irqchip_route(gsi: int, chip: int, pin: int) -> RoutingEntry:
    """A GSI to a pin of the in-kernel PIC (chip 0, 1) or IOAPIC (chip 2)."""
    e = RoutingEntry(gsi=gsi, type=IRQ_ROUTING_IRQCHIP)
    e.u.irqchip.irqchip = chip
    e.u.irqchip.pin = pin
    return e


def msi_route(gsi: int, address: int, data: int) -> RoutingEntry:
    e = RoutingEntry(gsi=gsi, type=IRQ_ROUTING_MSI)
    e.u.msi.address_lo = address & 0xFFFFFFFF
    e.u.msi.address_hi = address >> 32
    e.u.msi.data = data
    return e


def open_kvm() -> int:
    """/dev/kvm, checked: API version 12."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise KvmError(e.errno, f"/dev/kvm: {os.strerror(e.errno or 0)}") from None
    version = ioctl(fd, GET_API_VERSION)
    if version != 12:
        os.close(fd)
        raise KvmError(errno.ENOTSUP, f"KVM API version {version} (need 12)")
    return fd


def map_run(kvm_fd: int, vcpu_fd: int) -> tuple[mmap.mmap, Run]:
    size = ioctl(kvm_fd, GET_VCPU_MMAP_SIZE)
    mm = mmap.mmap(vcpu_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    # from_address, not from_buffer: no buffer export, so the map can be closed; the Run
    # must not be used after that
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    return mm, Run.from_address(addr)


def usable() -> str | None:
    """None if /dev/kvm can run a VM here, else why not."""
    if os.environ.get("ALACRITY_NO_KVM") == "1":
        return "ALACRITY_NO_KVM=1 is set"
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is absent"
    try:
        fd = open_kvm()
    except OSError as e:
        return str(e)
    try:
        vm = ioctl(fd, CREATE_VM, 0)
        os.close(vm)
    except OSError as e:
        return str(e)
    finally:
        os.close(fd)
    return None


def pvm_host() -> bool:
    """PVM (the page-table based nested KVM): CPL0 guest code is emulated there."""
    return os.path.exists("/sys/module/kvm_pvm")


assert ctypes.sizeof(Regs) == 144 and ctypes.sizeof(Sregs) == 312
assert ctypes.sizeof(IoEventFd) == 64 and ctypes.sizeof(IrqFd) == 32
assert ctypes.sizeof(UserspaceMemoryRegion) == 32 and ctypes.sizeof(Msi) == 32
assert Run.exit.offset == 32 and ctypes.sizeof(RoutingEntry) == 48
