"""The vbus PCI-bridge ABI (version 2, hypercall version 1): constants and structures,
byte for byte (include/linux/vbus_pci.h in ghaskins/alacrityvm-linux).

The bridge is two windows: BAR0 (MMIO, 64 bytes) holding one bridgecall descriptor
{u32 vector, u32 len, u64 datap}, run by reading its first word; and BAR1 (PIO, 32 bytes)
holding three doorbells: u32 eventq @0, u32 fastcall @4, u32 shmsignal @8. alacrity places
them at fixed addresses announced to the guest instead of emulating PCI configuration
space; the announcement carries the ABI version the PCI revision carried.
"""

import errno
import struct

BRIDGE_MAGIC = 0xBF53EEF5
ABI_VERSION = 2          # what the PCI revision said
HC_VERSION = 1           # what NEGOTIATE carries (pci-bridge.c: VBUS_PCI_HC_VERSION)

# bridgecall vectors
NEGOTIATE, QREG, SLOWCALL, FASTCALL_ADD, FASTCALL_DROP = range(5)
# hypercalls (through SLOWCALL, or a fastcall descriptor)
DEVOPEN, DEVCLOSE, DEVCALL, DEVSHM = range(4)
# bus events
EV_DEVADD, EV_DEVDROP, EV_SHMSIGNAL, EV_SHMCLOSE = range(4)

REGS_SIZE = 64
SIGNALS_SIZE = 32
SIG_EVENTQ, SIG_FASTCALL, SIG_SHMSIGNAL = 0, 4, 8

CALL_DESC = struct.Struct("<IIQ")            # vector, len, datap (16)
FASTCALL_DESC = struct.Struct("<IIQI4x")     # call {vector, len, datap}, result (24)
FASTCALL_RESULT = 16
NEGOTIATE_S = struct.Struct("<IIQ")          # magic, version, capabilities (16)
BUSREG_HDR = struct.Struct("<I4x")           # count; eventq[count] follow at 8
EVENTQREG = struct.Struct("<I4xQQ")          # count, ring, data (24)
DEVOPEN_S = struct.Struct("<IIQ")            # devid, version, handle (16)
DEVCLOSE_S = struct.Struct("<Q")             # handle (8)
DEVCALL_S = struct.Struct("<QIII4xQ")        # devh, func, len, flags, datap (32)
DEVSHM_S = struct.Struct("<QIII4xIIQQ")      # devh, id, len, flags, {offset, prio, cookie}, datap (48)
NO_SIGNAL = 0xFFFFFFFF                       # signal.offset when the shm has no signal

TYPE_LEN = 128
EVENT_SIZE = 144
EVENT_ADD = struct.Struct(f"<I4xQ{TYPE_LEN}s")   # eventid, id, type (144)
EVENT_HANDLE = struct.Struct("<I4xQ128x")        # eventid, handle (144)

# errors travel as negative errnos in a u32
EINVAL, ENODEV, EEXIST, EFAULT, ENOENT, EBUSY, ENOSPC, EPERM = (
    errno.EINVAL, errno.ENODEV, errno.EEXIST, errno.EFAULT, errno.ENOENT, errno.EBUSY,
    errno.ENOSPC, errno.EPERM)


def as_u32(result: int) -> int:
    return result & 0xFFFFFFFF


def as_int(u32: int) -> int:
    """A u32 result read back as the signed int it carries."""
    return u32 - (1 << 32) if u32 & 0x80000000 else u32


def devadd_event(devid: int, type_: str) -> bytes:
    return EVENT_ADD.pack(EV_DEVADD, devid, type_.encode()[:TYPE_LEN])


def handle_event(eventid: int, handle: int) -> bytes:
    return EVENT_HANDLE.pack(eventid, handle)
