"""A real network peer: the Linux kernel, through a tap device inside a network namespace
the test makes. The guest (a process guest running the tiny IPv4 host) answers ARP and
ping, and exchanges UDP datagrams with a socket in the namespace."""

import os
import subprocess
import sys

import pytest

from alacrity.devices.net import NetCore, TapBackend
from alacrity.errors import ConfigError
from alacrity.guest.process import ProcessGuest
from alacrity.machine import Machine
from alacrity.vbus.venet import Venet
from alacrity.virtio.net import VirtioNet

from tests.netns import need_tools, netns, sh

GUEST_IP, NS_IP = "10.77.0.2", "10.77.0.1"

RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{ip}", 7001))
s.settimeout(20)
data, addr = s.recvfrom(2048)
print(addr[0], data.decode(), flush=True)
"""

SENDER = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"hello from the namespace", ("{guest}", 7000))
time.sleep(0.3)
s.sendto(b"stop", ("{guest}", 7000))
"""


# vbus-sg: venet with scatter-gather descriptors from the PMTD pool and the event queue
# (LINKSTATE, TXC)
@pytest.mark.parametrize("abi", ["virtio-split", "virtio-packed", "vbus", "vbus-sg"])
def test_kernel_pings_the_guest_and_udp_flows_both_ways(abi):
    need_tools("ip", "ping")
    tap = f"altap{os.getpid() % 10000}"
    with netns(f"alacrity-{os.getpid()}-{abi[-5:]}") as ns:
        sh("ip", "tuntap", "add", "dev", tap, "mode", "tap")
        m = Machine(32 << 20)
        try:
            backend = m.attach(TapBackend(tap))
            core = NetCore(backend)
            if abi.startswith("vbus"):
                dev = Venet(core)
                m.add_vbus_bridge([dev])
            else:
                dev = m.add_virtio_mmio(VirtioNet(core))
            # the tap moves into the namespace, attached: the kernel there is our peer
            sh("ip", "link", "set", tap, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{NS_IP}/24", "dev", tap)
            sh("ip", "-n", ns, "link", "set", tap, "up")
            receiver = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                                         RECEIVER.format(ip=NS_IP)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            guest = ProcessGuest(m).start("alacrity.guest.programs:net_peer", {
                "ip": GUEST_IP, "peer": NS_IP, "peer_port": 7001,
                "abi": "vbus" if abi.startswith("vbus") else abi,
                "sg": abi == "vbus-sg", "pmtd": abi == "vbus-sg", "evq": abi == "vbus-sg",
                "send": "hello from the guest", "seconds": 40})
            ping = sh("ip", "netns", "exec", ns, "ping", "-c", "3", "-W", "3", GUEST_IP,
                      check=False, timeout=30)
            assert ping.returncode == 0, ping.stdout + ping.stderr
            assert "3 received" in ping.stdout
            out, err = receiver.communicate(timeout=25)
            assert out.strip() == f"{GUEST_IP} hello from the guest", err
            sh("ip", "netns", "exec", ns, sys.executable, "-c", SENDER.format(guest=GUEST_IP))
            r = guest.wait(timeout=40)
            guest.close()
            assert r["icmp_replies"] >= 3 and r["arp_replies"] >= 1
            assert [NS_IP, 7000, "hello from the namespace"] in [[u[0], u[2], u[3]] for u in r["udp"]]
            assert core.counters.rx_frames >= 5 and core.counters.tx_frames >= 5
            assert not dev.broken
            if abi == "vbus-sg":     # the frames really went through SG, PMTD and TXC
                assert dev.sg and dev.pmtd and dev.txc and dev.linkstate
                assert dev.tx_completions >= 5 and dev.malformed == 0
        finally:
            m.close()
            sh("ip", "link", "del", tap, check=False)


def test_missing_and_busy_tap_devices_are_one_clear_error():
    need_tools("ip")
    if os.geteuid() != 0:
        pytest.skip("creating tap devices needs root")
    with pytest.raises(ConfigError, match="no such network device"):
        TapBackend("alacrity-none")
    tap = f"albusy{os.getpid() % 10000}"
    sh("ip", "tuntap", "add", "dev", tap, "mode", "tap")
    try:
        first = TapBackend(tap)
        try:
            with pytest.raises(ConfigError, match="busy"):
                TapBackend(tap)
        finally:
            first.close()
    finally:
        sh("ip", "link", "del", tap, check=False)
