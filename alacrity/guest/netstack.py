"""A tiny IPv4 host for guests: answers ARP and ICMP echo for its address and sends and
receives UDP datagrams. Enough to prove a network device against a real kernel (ping, a
UDP socket), not a general stack: no fragments, no options, no routing beyond one subnet."""

from __future__ import annotations

import struct
import time
from typing import Any

ETH_ARP = 0x0806
ETH_IP = 0x0800
BROADCAST = b"\xff" * 6
ARP = struct.Struct(">HHBBH6s4s6s4s")         # htype, ptype, hlen, plen, op, sha, spa, tha, tpa
IPV4 = struct.Struct(">BBHHHBBH4s4s")        # ver/ihl, tos, len, id, frag, ttl, proto, csum, src, dst
UDP = struct.Struct(">HHHH")
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
PROTO_ICMP, PROTO_UDP = 1, 17


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f">{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip_bytes(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


class TinyHost:
    def __init__(self, driver: Any, ip: str):
        self.drv = driver
        self.mac = driver.mac
        self.ip = ip_bytes(ip)
        self.arp: dict[bytes, bytes] = {}
        self.udp_inbox: list[tuple[str, int, int, bytes]] = []
        self.counts = {"arp_replies": 0, "icmp_replies": 0, "udp_in": 0, "udp_out": 0,
                       "ignored": 0}
        self._ip_id = 0

    # -- sending ---------------------------------------------------------------------------
    def _send(self, frame: bytes) -> None:
        if len(frame) < 60:
            frame += bytes(60 - len(frame))   # Ethernet minimum (without FCS)
        while not self.drv.send(frame):
            self.drv.kick_tx()
            self.drv.wait(tx=True, timeout=1.0)
            self.drv.reclaim_tx()
        self.drv.kick_tx()

    def _eth(self, dst: bytes, ethertype: int, payload: bytes) -> bytes:
        return dst + self.mac + struct.pack(">H", ethertype) + payload

    def _ipv4(self, dst: bytes, proto: int, payload: bytes) -> bytes:
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        hdr = IPV4.pack(0x45, 0, 20 + len(payload), self._ip_id, 0x4000, 64, proto, 0, self.ip, dst)
        hdr = hdr[:10] + struct.pack(">H", checksum(hdr)) + hdr[12:]
        return hdr + payload

    def arp_request(self, target: bytes) -> None:
        body = ARP.pack(1, ETH_IP, 6, 4, 1, self.mac, self.ip, bytes(6), target)
        self._send(self._eth(BROADCAST, ETH_ARP, body))

    def send_udp(self, dst_ip: str, sport: int, dport: int, payload: bytes) -> bool:
        """Send a datagram if the peer's MAC is known (else ask for it and return False)."""
        dst = ip_bytes(dst_ip)
        mac = self.arp.get(dst)
        if mac is None:
            self.arp_request(dst)
            return False
        udp = UDP.pack(sport, dport, 8 + len(payload), 0) + payload
        pseudo = self.ip + dst + struct.pack(">BBH", 0, PROTO_UDP, len(udp))
        csum = checksum(pseudo + udp) or 0xFFFF
        udp = udp[:6] + struct.pack(">H", csum) + udp[8:]
        self._send(self._eth(mac, ETH_IP, self._ipv4(dst, PROTO_UDP, udp)))
        self.counts["udp_out"] += 1
        return True

    # -- receiving -------------------------------------------------------------------------
    def poll(self, timeout: float) -> None:
        """Handle whatever arrives within `timeout` seconds."""
        end = time.monotonic() + timeout
        while True:
            frames = self.drv.recv()
            if frames:
                self.drv.kick_rx()
                for f in frames:
                    self.handle(f)
                continue
            self.drv.reclaim_tx()
            left = end - time.monotonic()
            if left <= 0:
                return
            try:
                self.drv.wait(timeout=left)
            except TimeoutError:
                return

    def handle(self, frame: bytes) -> None:
        if len(frame) < 14:
            return
        dst, src, ethertype = frame[:6], frame[6:12], struct.unpack(">H", frame[12:14])[0]
        if dst not in (self.mac, BROADCAST):
            self.counts["ignored"] += 1
            return
        body = frame[14:]
        if ethertype == ETH_ARP and len(body) >= ARP.size:
            self._arp(body)
        elif ethertype == ETH_IP and len(body) >= 20:
            self._ip(src, body)
        else:
            self.counts["ignored"] += 1

    def _arp(self, body: bytes) -> None:
        _, ptype, _, _, op, sha, spa, _, tpa = ARP.unpack_from(body)
        if ptype != ETH_IP:
            return
        self.arp[spa] = sha                    # learn whoever speaks
        if op == 1 and tpa == self.ip:
            reply = ARP.pack(1, ETH_IP, 6, 4, 2, self.mac, self.ip, sha, spa)
            self._send(self._eth(sha, ETH_ARP, reply))
            self.counts["arp_replies"] += 1

    def _ip(self, src_mac: bytes, body: bytes) -> None:
        vihl, _, total, _, frag, _, proto, _, src, dst = IPV4.unpack_from(body)
        ihl = (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or dst != self.ip or frag & 0x3FFF or total > len(body) or ihl < 20:
            self.counts["ignored"] += 1
            return
        if checksum(body[:ihl]) != 0:
            self.counts["ignored"] += 1
            return
        self.arp.setdefault(src, src_mac)
        payload = body[ihl:total]
        if proto == PROTO_ICMP and len(payload) >= 8 and payload[0] == ICMP_ECHO_REQUEST:
            reply = bytes([ICMP_ECHO_REPLY, 0, 0, 0]) + payload[4:]
            reply = reply[:2] + struct.pack(">H", checksum(reply)) + reply[4:]
            self._send(self._eth(src_mac, ETH_IP, self._ipv4(src, PROTO_ICMP, reply)))
            self.counts["icmp_replies"] += 1
        elif proto == PROTO_UDP and len(payload) >= 8:
            sport, dport, length, _ = UDP.unpack_from(payload)
            data = payload[8:length]
            self.udp_inbox.append((".".join(map(str, src)), sport, dport, data))
            self.counts["udp_in"] += 1
        else:
            self.counts["ignored"] += 1
