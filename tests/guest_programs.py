"""Guest programs used only by tests (imported inside process guests)."""

import os
import socket
import time

from alacrity.guest.process import ACCESS, K_READ


def crash(machine, args):
    raise RuntimeError("the guest program fell over")


def garbage_on_the_control_socket(machine, args):
    machine.sock.send(b"\x09" + b"nonsense")
    time.sleep(30)


def access_of_bad_size(machine, args):
    machine.sock.send(ACCESS.pack(K_READ, 0, 3, 0xD0000000, 0))
    time.sleep(30)


def exit_quietly(machine, args):
    os._exit(3)


def sleep_forever(machine, args):
    time.sleep(3600)


def sock_closed(machine, args):
    machine.sock.shutdown(socket.SHUT_RDWR)
    time.sleep(30)
