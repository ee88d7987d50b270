"""A user-space packet delayer over NFQUEUE, for kernels built without ``sch_netem`` (``tc qdisc ... netem``: "Specified
qdisc kind is unknown"). Standard library only: it speaks nfnetlink_queue over a raw netlink socket.

``python netdelay.py QUEUE:DELAY_MS[:JITTER_MS] ...`` binds each queue (iptables ``-j NFQUEUE --queue-num QUEUE``),
holds every packet for its delay (plus a uniform jitter in [0, JITTER_MS)), and accepts it. Packets leave in the order
they came (a jittered packet also holds back those behind it, so nothing is reordered), which lets one batch verdict
release every due packet of a queue at once. Payloads are never copied to user space (copy mode META, GSO kept).
Started inside a namespace by ``Lab.shape`` (tests/support/netns.py) and stopped by PID.
"""

from __future__ import annotations

import collections
import os
import random
import select
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
MSG_PACKET, MSG_VERDICT_BATCH, MSG_CONFIG = 0, 3, 2
NLM_F_REQUEST = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
CMD_BIND = 1
COPY_META = 1
F_GSO = 1 << 2
NF_ACCEPT = 1
MAXLEN = 1 << 16


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _msg(kind: int, queue: int, attrs: bytes, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, NLM_F_REQUEST, seq, 0) + body


def _bind(sock: socket.socket, queue: int) -> None:
    sock.send(_msg(MSG_CONFIG, queue, _attr(NFQA_CFG_CMD, struct.pack("!BBH", CMD_BIND, 0, 0))))
    attrs = (
        _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, COPY_META))
        + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", MAXLEN))
        + _attr(NFQA_CFG_MASK, struct.pack("!I", F_GSO))
        + _attr(NFQA_CFG_FLAGS, struct.pack("!I", F_GSO))
    )
    sock.send(_msg(MSG_CONFIG, queue, attrs))


def _packets(data: bytes) -> list[tuple[int, int]]:
    """(queue, packet id) of every queued-packet message in one netlink read."""
    out = []
    pos = 0
    while pos + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, pos)
        if length < 16:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | MSG_PACKET:
            queue = socket.ntohs(struct.unpack_from("=H", data, pos + 18)[0])
            apos, end = pos + 20, pos + length
            while apos + 4 <= end:
                alen, akind = struct.unpack_from("=HH", data, apos)
                if alen < 4:
                    break
                if akind & 0x7FFF == NFQA_PACKET_HDR:
                    out.append((queue, struct.unpack_from("!I", data, apos + 4)[0]))
                    break
                apos += alen + (-alen % 4)
        pos += length + (-length % 4)
    return out


def run(spec: dict[int, tuple[float, float]]) -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: bursts at 1 Gbit/s must not overflow
    sock.bind((0, 0))
    for queue in spec:
        _bind(sock, queue)
    held: dict[int, collections.deque[tuple[float, int]]] = {q: collections.deque() for q in spec}
    last_due = dict.fromkeys(spec, 0.0)
    rng = random.Random()
    while True:
        now = time.monotonic()
        for queue, packets in held.items():
            release = None
            while packets and packets[0][0] <= now:
                release = packets.popleft()[1]
            if release is not None:
                hdr = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, release))
                sock.send(_msg(MSG_VERDICT_BATCH, queue, hdr))
        due = [p[0][0] for p in held.values() if p]
        timeout = max(0.0, min(due) - time.monotonic()) if due else 1.0
        if select.select([sock], [], [], timeout)[0]:
            while True:
                try:
                    data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                now = time.monotonic()
                for queue, pid in _packets(data):
                    delay, jitter = spec.get(queue, (0.0, 0.0))
                    at = max(now + (delay + rng.random() * jitter) / 1000, last_due[queue])
                    last_due[queue] = at
                    held[queue].append((at, pid))


def main(argv: list[str]) -> None:
    spec = {}
    for arg in argv:
        parts = [float(x) for x in arg.split(":")]
        spec[int(parts[0])] = (parts[1], parts[2] if len(parts) > 2 else 0.0)
    if not spec:
        sys.exit("usage: netdelay.py QUEUE:DELAY_MS[:JITTER_MS] ...")
    if os.geteuid() == 0:
        os.nice(-5)
    run(spec)


if __name__ == "__main__":
    main(sys.argv[1:])
