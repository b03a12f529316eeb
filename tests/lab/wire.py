"""What crossed a lab network: a pcap file (tcpdump -w) read back as TCP byte streams.

The cluster token is looked for in each stream's reassembled bytes, not in single packets: a header value may be
split across two segments. Only what the lab produces is handled: Ethernet (or Linux cooked) frames, IPv4, TCP.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ETHERNET, LINUX_SLL = 1, 113
SYN, ACK = 0x02, 0x10


@dataclass(frozen=True)
class Flow:
    src: str
    sport: int
    dst: str
    dport: int

    def __str__(self) -> str:
        return f"{self.src}:{self.sport} -> {self.dst}:{self.dport}"


def _ip(raw: bytes) -> str:
    return ".".join(str(b) for b in raw)


def packets(path: Path) -> list[tuple[Flow, int, int, bytes]]:
    """(flow, sequence number, TCP flags, payload) of every TCP segment, in capture order."""
    data = path.read_bytes()
    if len(data) < 24:
        raise ValueError(f"{path}: not a pcap file ({len(data)} bytes)")
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a pcap file (magic {magic.hex()}; pcapng is not read here)")
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    if linktype not in (ETHERNET, LINUX_SLL):
        raise ValueError(f"{path}: link type {linktype} is not Ethernet or Linux cooked")
    out: list[tuple[Flow, int, int, bytes]] = []
    offset = 24
    while offset + 16 <= len(data):
        caplen = struct.unpack(endian + "I", data[offset + 8:offset + 12])[0]
        frame = data[offset + 16:offset + 16 + caplen]
        offset += 16 + caplen
        header = 14 if linktype == ETHERNET else 16
        if len(frame) < header + 20 or frame[header - 2:header] != b"\x08\x00":  # IPv4 only
            continue
        ip = frame[header:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        if ip[9] != 6 or len(ip) < ihl + 20:  # TCP only
            continue
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        payload = tcp[(tcp[12] >> 4) * 4:]
        out.append((Flow(_ip(ip[12:16]), sport, _ip(ip[16:20]), dport), seq, tcp[13], bytes(payload)))
    return out


def opened(path: Path) -> set[Flow]:
    """The connections the capture saw start (the client's SYN), as client -> server flows."""
    return {flow for flow, _, flags, _ in packets(path) if flags & SYN and not flags & ACK}


def streams(path: Path) -> dict[Flow, bytes]:
    """Each direction of each TCP connection as the bytes it carried, retransmissions counted once."""
    segments: dict[Flow, dict[int, bytes]] = defaultdict(dict)
    for flow, seq, _, payload in packets(path):
        if payload and len(payload) > len(segments[flow].get(seq, b"")):
            segments[flow][seq] = payload
    out: dict[Flow, bytes] = {}
    for flow, by_seq in segments.items():
        buf, end = bytearray(), None
        # Sequence numbers wrap at 2**32: order them from the first one seen.
        first = min(by_seq)
        for seq in sorted(by_seq, key=lambda s: (s - first) % 2**32):
            payload = by_seq[seq]
            if end is not None:
                overlap = (end - seq) % 2**32
                if overlap < len(payload):
                    payload = payload[overlap:]
                elif overlap < 2**31:
                    continue
            buf += payload
            end = (seq + len(by_seq[seq])) % 2**32
        out[flow] = bytes(buf)
    return out


def count(path: Path, needles: list[bytes]) -> dict[Flow, int]:
    """How often any of NEEDLES occurs in each stream of the capture (streams without any left out)."""
    found = {}
    for flow, data in streams(path).items():
        n = sum(data.count(needle) for needle in needles)
        if n:
            found[flow] = n
    return found
