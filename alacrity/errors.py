"""The two ways things go wrong: the guest broke the ABI, or the user asked for the impossible."""


class GuestError(Exception):
    """The guest broke the ABI (bad address, bad index, bad chain...).

    The device that sees it stops processing and reports the error the ABI defines
    (virtio: DEVICE_NEEDS_RESET); the host process keeps running.
    """


class ConfigError(Exception):
    """The user asked for something impossible; the CLI prints one line and exits 2."""


class DeviceError(Exception):
    """The device broke the ABI, as a guest-side driver sees it (a used id never made
    available, an index that runs ahead). Drivers raise it; they never trust the device."""
