#!/usr/bin/env python3
"""Where a run's lost datagrams were dropped.

Samples the kernel's per-socket drop counters (the `drops` column of /proc/net/udp and
/proc/net/udp6: datagrams that arrived at a socket whose receive buffer was full) of the
sockets each named process owns, every INTERVAL seconds until the watched process
exits, then once more. Each socket keeps the highest count seen (relay sockets close
during a run; a socket's drops in its last interval before closing are missed).

usage: udpdrops.py --until PID ROLE=PID [ROLE=PID ...]
prints one line: drops_<role>=N for each role (e.g. drops_server=0 drops_peer=1234)
"""

import os
import sys
import time

INTERVAL = 0.5


def socket_inodes(pid):
    """The inodes of the sockets process `pid` has open (empty once it has exited)."""
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(link[8:-1])
    except OSError:
        pass
    return out


def drops_by_inode():
    """inode -> drops for every UDP socket of this network namespace."""
    out = {}
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref ptr drops
                    if len(cols) >= 13:
                        out[cols[9]] = int(cols[12])
        except OSError:
            pass
    return out


def main(argv):
    if len(argv) < 3 or argv[0] != "--until":
        sys.exit(__doc__)
    until = argv[1]
    roles = {}
    for arg in argv[2:]:
        role, _, pid = arg.partition("=")
        if not role or not pid.isdigit():
            sys.exit(f"udpdrops.py: bad ROLE=PID argument {arg!r}")
        roles[role] = pid
    owner = {}  # inode -> role
    best = {}  # inode -> highest drops seen
    deadline = time.monotonic() + 600  # never outlive a stuck run

    def sample():
        for role, pid in roles.items():
            for ino in socket_inodes(pid):
                owner.setdefault(ino, role)
        for ino, d in drops_by_inode().items():
            if ino in owner and d > best.get(ino, 0):
                best[ino] = d

    while os.path.exists(f"/proc/{until}") and time.monotonic() < deadline:
        sample()
        time.sleep(INTERVAL)
    sample()
    totals = {role: 0 for role in roles}
    for ino, d in best.items():
        totals[owner[ino]] += d
    print(" ".join(f"drops_{role}={n}" for role, n in totals.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
