"""A descriptor chain as a device sees it, whatever the ring layout."""

from __future__ import annotations


class Chain:
    """One buffer: its device-readable pieces, then its device-writable pieces, each a view
    of guest memory already checked against RAM. `head` is what the used entry names (the
    head descriptor of a split ring, the buffer id of a packed ring); `ndesc` is how many
    ring slots the buffer took (the packed ring skips that many when it is used)."""

    __slots__ = ("head", "readable", "writable", "read_len", "write_len", "ndesc")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview],
                 read_len: int, write_len: int, ndesc: int = 1):
        self.head = head
        self.readable = readable
        self.writable = writable
        self.read_len = read_len
        self.write_len = write_len
        self.ndesc = ndesc

    def __repr__(self) -> str:
        return (f"Chain(head={self.head}, readable={[len(v) for v in self.readable]}, "
                f"writable={[len(v) for v in self.writable]})")
