"""NVIDIA GPU detection (nvidia-smi, else NVML through ctypes) and the inventory that hands GPUs
to tasks by CDI name ("nvidia.com/gpu=0").

Detection never raises: a machine without GPUs, drivers or tools reports no GPUs and says why.

gpu_score(gpu) = round(10 * memory GiB * family factor). Memory bounds what a task can load and
the family factor ranks compute generations; both are coarse on purpose, the pool only needs an
ordering. Factors (matched in order, on the upper-cased name): H200/H100/GH200/B200 4.0,
A100/A800 2.0, L40/ADA 1.5, A10/A30/A40/A6000 1.0, V100 0.8, T4 0.5, anything else 1.0.
An H100 80GB (81559 MiB) scores 3186, a T4 (15360 MiB) 75.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from hivemind.errors import AdmissionRefused

NVIDIA_SMI_QUERY = ("nvidia-smi",
                    "--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu",
                    "--format=csv,noheader,nounits")
NVML_LIBRARY = "libnvidia-ml.so.1"
# Runs a command and returns its stdout; raises OSError or subprocess.SubprocessError.
Runner = Callable[[Sequence[str]], str]

_FAMILY_FACTORS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200", "H100", "GH200", "B200"), 4.0),
    (("A100", "A800"), 2.0),
    (("L40", "ADA"), 1.5),
    (("A10", "A30", "A40", "A6000"), 1.0),
    (("V100",), 0.8),
    (("T4",), 0.5),
)


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_total_mib: int
    memory_used_mib: int
    utilization_pct: int | None  # None when the driver doesn't say (e.g. MIG)

    @property
    def cdi_name(self) -> str:
        return f"nvidia.com/gpu={self.index}"


@dataclass(frozen=True)
class GpuDetection:
    gpus: tuple[Gpu, ...]
    source: str  # "nvidia-smi", "nvml" or "none"
    reason: str | None = None  # why no GPU was found; None when source isn't "none"


class GpuParseError(ValueError):
    """nvidia-smi printed something that isn't the CSV asked for."""


def gpu_score(gpu: Gpu) -> int:
    name = gpu.name.upper()
    factor = next((f for keys, f in _FAMILY_FACTORS if any(k in name for k in keys)), 1.0)
    return round(10 * gpu.memory_total_mib / 1024 * factor)


def parse_nvidia_smi_csv(text: str) -> tuple[Gpu, ...]:
    gpus = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        cols = [c.strip() for c in line.split(",")]
        if len(cols) != 6:
            raise GpuParseError(f"line {lineno}: expected 6 columns, got {len(cols)}")
        try:
            gpus.append(Gpu(index=int(cols[0]), uuid=cols[1], name=cols[2],
                            memory_total_mib=int(cols[3]), memory_used_mib=_int_or_zero(cols[4]),
                            utilization_pct=None if cols[5].startswith("[") else int(cols[5])))
        except ValueError:
            raise GpuParseError(f"line {lineno}: not a GPU row") from None
        if not cols[1].startswith(("GPU-", "MIG-")):
            raise GpuParseError(f"line {lineno}: {cols[1][:40]!r} is not a GPU UUID")
    return tuple(gpus)


def _int_or_zero(text: str) -> int:
    return 0 if text.startswith("[") else int(text)  # "[N/A]", "[Not Supported]"


def _run(argv: Sequence[str]) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True,
                          timeout=15).stdout


def detect_gpus(runner: Runner | None = _run, nvml_library: str | None = NVML_LIBRARY,
                logger: logging.Logger | None = None) -> GpuDetection:
    """nvidia-smi first, then NVML; pass None to skip either. Never raises."""
    log = logger or logging.getLogger(__name__)
    reasons = []
    if runner is not None:
        try:
            gpus = parse_nvidia_smi_csv(runner(NVIDIA_SMI_QUERY))
            if gpus:
                return GpuDetection(gpus, "nvidia-smi")
            reasons.append("nvidia-smi lists no GPU")
        except FileNotFoundError:
            reasons.append("nvidia-smi not found")
        except (OSError, subprocess.SubprocessError, GpuParseError) as exc:
            reasons.append(f"nvidia-smi failed: {_short(exc)}")
    if nvml_library is not None:
        try:
            gpus = _nvml_gpus(nvml_library)
            if gpus:
                return GpuDetection(gpus, "nvml")
            reasons.append("NVML lists no GPU")
        except OSError as exc:
            reasons.append(f"NVML unavailable: {_short(exc)}")
    reason = "; ".join(reasons) or "GPU detection disabled"
    log.info("no GPU: %s", reason)
    return GpuDetection((), "none", reason)


def _short(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        return f"exit status {exc.returncode}"
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong),
                ("used", ctypes.c_ulonglong)]


class _NvmlUtilization(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


def _nvml_gpus(library: str) -> tuple[Gpu, ...]:
    """Reads every GPU through NVML (raises OSError when it can't be loaded or initialised)."""
    nvml = ctypes.CDLL(library)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise OSError(f"{what} returned NVML error {rc}")

    check(nvml.nvmlInit_v2(), "nvmlInit_v2")
    try:
        count = ctypes.c_uint()
        check(nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)), "nvmlDeviceGetCount_v2")
        gpus = []
        for i in range(count.value):
            dev = ctypes.c_void_p()
            check(nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(dev)), "GetHandleByIndex")
            name, uuid = ctypes.create_string_buffer(96), ctypes.create_string_buffer(96)
            check(nvml.nvmlDeviceGetName(dev, name, 96), "GetName")
            check(nvml.nvmlDeviceGetUUID(dev, uuid, 96), "GetUUID")
            mem = _NvmlMemory()
            check(nvml.nvmlDeviceGetMemoryInfo(dev, ctypes.byref(mem)), "GetMemoryInfo")
            util = _NvmlUtilization()
            util_pct = (util.gpu if nvml.nvmlDeviceGetUtilizationRates(dev, ctypes.byref(util)) == 0
                        else None)
            gpus.append(Gpu(index=i, uuid=uuid.value.decode(errors="replace"),
                            name=name.value.decode(errors="replace"),
                            memory_total_mib=mem.total // (1 << 20),
                            memory_used_mib=mem.used // (1 << 20), utilization_pct=util_pct))
        return tuple(gpus)
    finally:
        nvml.nvmlShutdown()


class GpuInventory:
    """Which GPUs are free; thread-safe. Tasks get CDI names to pass to Podman's devices.

    allocate(count=N, memory_gb=M): N free GPUs with at least M GiB each, smallest that fits
    first (big GPUs stay free for big requests). allocate(memory_gb=M) alone: the fewest free
    GPUs whose memory adds up to M GiB, largest first. Raises AdmissionRefused when the free
    GPUs can't satisfy the request now.
    """

    def __init__(self, gpus: Iterable[Gpu]) -> None:
        self._gpus = {g.cdi_name: g for g in gpus}
        self._free = set(self._gpus)
        self._lock = threading.Lock()

    @property
    def gpus(self) -> tuple[Gpu, ...]:
        return tuple(self._gpus.values())

    def free(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted(self._free, key=lambda n: self._gpus[n].index))

    def allocate(self, count: int = 0, memory_gb: float = 0.0) -> tuple[str, ...]:
        if count < 0 or memory_gb < 0:
            raise ValueError("count and memory_gb must not be negative")
        if count == 0 and memory_gb == 0:
            return ()
        with self._lock:
            free = [self._gpus[n] for n in self._free]
            if count:
                fits = sorted((g for g in free if g.memory_total_mib >= memory_gb * 1024),
                              key=lambda g: (g.memory_total_mib, g.index))
                chosen = fits[:count]
                if len(chosen) < count:
                    raise AdmissionRefused(
                        f"{count} GPU(s) with >= {memory_gb:g} GiB requested; {len(fits)} free")
            else:
                chosen, total = [], 0
                for g in sorted(free, key=lambda g: (-g.memory_total_mib, g.index)):
                    if total >= memory_gb * 1024:
                        break
                    chosen.append(g)
                    total += g.memory_total_mib
                if total < memory_gb * 1024:
                    raise AdmissionRefused(
                        f"{memory_gb:g} GiB of GPU memory requested; {total / 1024:g} GiB free")
            names = tuple(g.cdi_name for g in sorted(chosen, key=lambda g: g.index))
            self._free.difference_update(names)
            return names

    def release(self, names: Iterable[str]) -> None:
        """Returns GPUs to the pool; idempotent, and names this inventory doesn't know are ignored."""
        with self._lock:
            self._free.update(n for n in names if n in self._gpus)
