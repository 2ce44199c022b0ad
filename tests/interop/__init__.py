"""Interop tests: programs nobody here wrote (DPDK, QEMU, qemu-storage-daemon, Linux)."""
