#!/usr/bin/env python3
"""Hold every packet of an NFQUEUE queue for a fixed time, then let it go.

Stands in for ``tc netem delay`` on kernels built without sch_netem: the
packets wait in the kernel's queue for this process's verdict, so TCP sees a
real round-trip time, with its own retransmission and congestion behaviour.
Loss is added apart (iptables' ``statistic`` match before the NFQUEUE rule).

    ip netns exec NS iptables -A OUTPUT -o IF -j NFQUEUE --queue-num 7
    ip netns exec NS tools/link_delay.py --queue 7 --delay 0.05

Prints ``ready`` on stdout once the queue is bound, and runs until killed.
A fixed delay keeps the queue in arrival order, so a deque is enough.
"""

from __future__ import annotations

import argparse
import collections
import sys
import threading
import time
from typing import Any

from netfilterqueue import NetfilterQueue  # type: ignore[import-not-found]


class Delayer:
    """Packets go in with a release time; a thread gives each its verdict at that time."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.held: collections.deque[tuple[float, Any]] = collections.deque()
        self.wake = threading.Condition()
        threading.Thread(target=self._release, daemon=True).start()

    def arrive(self, packet: Any) -> None:
        with self.wake:
            self.held.append((time.monotonic() + self.delay, packet))
            self.wake.notify()

    def _release(self) -> None:
        while True:
            with self.wake:
                while not self.held:
                    self.wake.wait()
                due, packet = self.held[0]
                late = due - time.monotonic()
                if late > 0:
                    self.wake.wait(late)
                    continue
                self.held.popleft()
            packet.accept()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, required=True, help="NFQUEUE number")
    parser.add_argument("--delay", type=float, required=True, help="seconds each packet waits")
    parser.add_argument("--max-held", type=int, default=65536,
                        help="packets the kernel may queue before it drops")
    args = parser.parse_args()
    delayer = Delayer(args.delay)
    queue = NetfilterQueue()
    queue.bind(args.queue, delayer.arrive, max_len=args.max_held)
    print("ready", flush=True)
    try:
        queue.run()
    except KeyboardInterrupt:
        pass
    finally:
        queue.unbind()
    return 0


if __name__ == "__main__":
    sys.exit(main())
