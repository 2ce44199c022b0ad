"""alacrity: a paravirtual I/O framework and micro-hypervisor (virtio and vbus, measured)."""

__version__ = "0.1.0"
