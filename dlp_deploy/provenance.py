"""What produced a result file: versions, machine, time. Every JSON the tool writes embeds this."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import os
import platform
import sys
from functools import lru_cache
from pathlib import Path

_PACKAGES = ("dlp-deploy", "torch", "transformers", "onnx", "onnxruntime", "deepsparse", "numpy", "datasets")
_ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512vnni", "avx_vnni", "avx512_bf16", "amx_tile",
              "amx_int8", "amx_bf16", "fma", "f16c")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = _md.version(name)
        except _md.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return fh.read().splitlines()
    except OSError:
        return []


@lru_cache(maxsize=1)
def machine_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    for line in _cpuinfo_lines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": model,
        "isa": sorted(f for f in _ISA_FLAGS if f in flags),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": _memory_gib(),
        "last_level_cache_bytes": _last_level_cache_bytes(),
        "os": platform.platform(),
        "arch": platform.machine(),
    }


def _last_level_cache_bytes() -> int | None:
    """The largest cache cpu0 sees (sysfs; None where unreadable): whether a model's weights stay in cache or
    stream from DRAM on every token decides what sparsity can save."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes, default=None)


def _memory_gib() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        return None


def provenance(**extra) -> dict:
    """The block stored under "provenance" in every result file."""
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "versions": package_versions(),
        "machine": machine_info(),
        **extra,
    }


class PeakRSS:
    """Samples this process's resident memory in a background thread while a `with` block runs: the start and
    the peak (what a prune really needs; ru_maxrss would carry earlier work of a long-lived process)."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.start = self.peak = 0

    def __enter__(self):
        import threading

        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    def as_dict(self) -> dict:
        return {"rss_start_bytes": self.start, "rss_peak_bytes": self.peak,
                "rss_growth_bytes": self.peak - self.start}
