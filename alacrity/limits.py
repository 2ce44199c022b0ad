"""Limits a user sets on what a guest may ask of a device.

A guest that exceeds one has broken the device's rules (a guest error: DEVICE_NEEDS_RESET,
a failed vbus call, a closed vhost-user connection); the check happens before anything is
allocated or copied for the request. The defaults are QEMU's (VIRTQUEUE_MAX_SIZE 1024,
IOV_MAX 1024 segments); the request-size default is far above what Linux sends.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_queue_size: int = 1024       # ring entries (virtio QueueNumMax, IOQ count)
    max_segments: int = 1024         # buffers in one request (a chain, a venet SG list)
    max_request_bytes: int = 256 << 20   # total length of one request's buffers

    def __post_init__(self) -> None:
        for name in ("max_queue_size", "max_segments", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_queue_size > 32768:
            raise ValueError("max_queue_size is at most 32768 (the virtio maximum)")

    def queue_max(self, device_max: int) -> int:
        """The queue size a device offers: its own maximum, capped by the user's."""
        return min(device_max, self.max_queue_size)


DEFAULT = Limits()
