"""Which process is which: a pid with its start time (a bare pid is reused), read from Linux /proc.

Used by the ranks to watch their supervisor (:mod:`fft_dist.preemption`) and by temporaries that
name the process writing them (an export in progress), so that a later process can tell a
leftover of a killed one from the work of a live one.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket

_TOKEN = re.compile(r"^(?P<host>[0-9a-f]{8})(?P<pid>[0-9a-f]{8})(?P<start>[0-9a-f]{16})$")


def start_time(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
    if len(fields) < 20 or fields[0] == "Z":
        return None  # a zombie has finished: it is no one's supervisor
    return int(fields[19])


def alive(pid: int, started: int) -> bool:
    """True while the process `pid` that started at `started` runs (not another one with its pid)."""
    return start_time(pid) == started


def host_tag(host: str | None = None) -> str:
    return hashlib.sha1((host or socket.gethostname()).encode()).hexdigest()[:8]


def process_token(pid: int | None = None) -> str:
    """32 hex digits naming this host, `pid` (default: this process) and its start time."""
    pid = os.getpid() if pid is None else pid
    return f"{host_tag()}{pid:08x}{start_time(pid) or 0:016x}"


def token_is_stale(token: str) -> bool:
    """True when `token` names a process of this host that is no longer running. A token of another
    host is never stale here: that process may be alive and is not ours to judge."""
    m = _TOKEN.match(token)
    if m is None or m.group("host") != host_tag():
        return False
    return not alive(int(m.group("pid"), 16), int(m.group("start"), 16))
