"""The CPU time a server spends, read from /proc: user + system time of every thread of
every process in its process group (workers included).

CPU per answered request is much steadier than throughput on a shared machine: another
process taking a core makes the server slower, but barely changes what each request costs.
"""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_group_cpu_seconds(pgid: int) -> float:
    """utime + stime (fields 14 and 15 of /proc/PID/stat, every thread included) of the
    live processes of a process group, in seconds."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone since we listed it
        # The command name (field 2) may hold spaces and parentheses: split after it.
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state); field 5 (pgrp) is fields[2].
        if int(fields[2]) != pgid:
            continue
        ticks += int(fields[11]) + int(fields[12])  # fields 14, 15
    return ticks / CLOCK_TICKS
