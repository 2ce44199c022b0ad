"""Constants from the VIRTIO 1.x specification (feature bits, status bits, device ids)."""

# Device status (2.1)
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 0x40
FAILED = 0x80

# Reserved feature bits (6)
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35

# Device ids (5)
ID_NET = 1
ID_BLOCK = 2
ID_CONSOLE = 3
ID_RNG = 4

# Split virtqueue descriptor and ring flags (2.7)
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

# Packed virtqueue (2.8)
DESC_F_AVAIL = 1 << 7
DESC_F_USED = 1 << 15
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2

MAX_QUEUE_SIZE = 32768

# Our vendor id in virtio-mmio ("ALAC" would be cute, but QEMU-style little-endian ASCII)
VENDOR_ID = 0x43414C41  # "ALAC"


def bit(n: int) -> int:
    return 1 << n


def need_event(event_idx: int, new: int, old: int) -> bool:
    """vring_need_event: did moving an index from `old` to `new` cross `event_idx`?
    All three are 16-bit ring indexes; the arithmetic wraps at 2**16."""
    return ((new - event_idx - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
