"""Host memory, swap and CPU time from procfs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Columns of the aggregate "cpu" line in /proc/stat, in order (guest time is already counted in user/nice).
CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


@dataclass(frozen=True, slots=True)
class HostSample:
    memory_total_bytes: int
    memory_available_bytes: int
    swap_total_bytes: int
    swap_free_bytes: int
    cpu_seconds: tuple[tuple[str, float], ...]


class HostReadError(Exception):
    pass


class HostReader:
    def __init__(self, proc_path: Path = Path("/proc")) -> None:
        self.proc_path = proc_path
        self._ticks_per_second = os.sysconf("SC_CLK_TCK")

    def read(self) -> HostSample:
        meminfo = self._meminfo()
        try:
            return HostSample(
                memory_total_bytes=meminfo["MemTotal"],
                memory_available_bytes=meminfo["MemAvailable"],
                swap_total_bytes=meminfo["SwapTotal"],
                swap_free_bytes=meminfo["SwapFree"],
                cpu_seconds=self._cpu_seconds(),
            )
        except KeyError as err:
            raise HostReadError(f"{self.proc_path / 'meminfo'} has no {err.args[0]} line") from None

    def _read(self, name: str) -> str:
        try:
            return (self.proc_path / name).read_text(encoding="ascii")
        except OSError as err:
            raise HostReadError(f"cannot read {self.proc_path / name}: {err.strerror}") from None

    def _meminfo(self) -> dict[str, int]:
        values = {}
        for line in self._read("meminfo").splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if not parts:
                continue
            try:
                number = int(parts[0])
            except ValueError:
                continue
            values[key] = number * 1024 if len(parts) > 1 and parts[1] == "kB" else number
        return values

    def _cpu_seconds(self) -> tuple[tuple[str, float], ...]:
        for line in self._read("stat").splitlines():
            fields = line.split()
            if fields and fields[0] == "cpu":
                ticks = [int(v) for v in fields[1 : 1 + len(CPU_MODES)]]
                return tuple(
                    (mode, value / self._ticks_per_second)
                    for mode, value in zip(CPU_MODES, ticks, strict=False)
                )
        raise HostReadError(f"{self.proc_path / 'stat'} has no aggregate cpu line")
