"""The virtio ABI: rings (split, later packed), the virtio-mmio transport, device framing."""
