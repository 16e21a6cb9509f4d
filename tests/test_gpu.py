"""GPU detection from recorded nvidia-smi output, NVML through a stand-in library, the
inventory and the score."""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from hivemind.errors import AdmissionRefused
from hivemind.metrics.gpu import (
    NVIDIA_SMI_QUERY,
    Gpu,
    GpuInventory,
    GpuParseError,
    detect_gpus,
    gpu_score,
    parse_nvidia_smi_csv,
)

DATA = Path(__file__).parent / "data"


class RecordedRunner:
    """Plays back one recorded nvidia-smi run and remembers what it was asked."""

    def __init__(self, stdout: str = "", exc: BaseException | None = None) -> None:
        self.stdout, self.exc = stdout, exc
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> str:
        self.calls.append(tuple(argv))
        if self.exc is not None:
            raise self.exc
        return self.stdout


def recorded(name: str) -> RecordedRunner:
    return RecordedRunner((DATA / name).read_text())


def test_one_gpu() -> None:
    runner = recorded("nvidia-smi-1gpu.csv")
    d = detect_gpus(runner, nvml_library=None)
    assert runner.calls == [NVIDIA_SMI_QUERY]
    assert d.source == "nvidia-smi" and d.reason is None
    (g,) = d.gpus
    assert g == Gpu(0, "GPU-5f8e3c1a-9b2d-4c7e-8a1f-2d3b4c5e6f70", "NVIDIA H100 80GB HBM3",
                    81559, 1, 0)
    assert g.cdi_name == "nvidia.com/gpu=0"


def test_two_gpus() -> None:
    d = detect_gpus(recorded("nvidia-smi-2gpu.csv"), nvml_library=None)
    assert [(g.index, g.name, g.memory_total_mib, g.memory_used_mib, g.utilization_pct)
            for g in d.gpus] == [(0, "Tesla T4", 15360, 0, 0),
                                 (1, "NVIDIA A100-SXM4-40GB", 40960, 1203, 37)]


def test_not_available_fields_are_none() -> None:
    (g,) = parse_nvidia_smi_csv((DATA / "nvidia-smi-mig-na.csv").read_text())
    assert (g.memory_used_mib, g.utilization_pct) == (0, None)


@pytest.mark.parametrize("text", [
    (DATA / "nvidia-smi-garbage.txt").read_text(),
    "0, GPU-x, name, lots, 0, 0\n",
    "0, not-a-uuid, Tesla T4, 15360, 0, 0\n",
    "0, GPU-x, a, b\n",
])
def test_garbage_is_a_parse_error(text: str) -> None:
    with pytest.raises(GpuParseError):
        parse_nvidia_smi_csv(text)


@pytest.mark.parametrize(("runner", "why"), [
    (recorded("nvidia-smi-garbage.txt"), "nvidia-smi failed: line 1"),
    (RecordedRunner(exc=FileNotFoundError(2, "No such file")), "nvidia-smi not found"),
    (RecordedRunner(exc=subprocess.CalledProcessError(9, "nvidia-smi")), "exit status 9"),
    (RecordedRunner(exc=subprocess.TimeoutExpired("nvidia-smi", 15)), "nvidia-smi failed"),
    (RecordedRunner(""), "nvidia-smi lists no GPU"),
])
def test_no_gpu_says_why(runner: RecordedRunner, why: str,
                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="test.gpu"):
        d = detect_gpus(runner, nvml_library="/nonexistent/libnvidia-ml.so.1",
                        logger=logging.getLogger("test.gpu"))
    assert d.gpus == () and d.source == "none"
    assert d.reason is not None and why in d.reason and "NVML unavailable" in d.reason
    assert [r.getMessage() for r in caplog.records] == [f"no GPU: {d.reason}"]


def test_real_binary_missing_on_this_machine() -> None:
    """The default runner against this machine's PATH (no NVIDIA driver here)."""
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi; the missing-binary path can't be shown here")
    d = detect_gpus(nvml_library=None)
    assert d.source == "none" and d.reason == "nvidia-smi not found"


FAKE_NVML = r"""
#include <string.h>
typedef struct { unsigned long long total, free, used; } mem_t;
typedef struct { unsigned int gpu, memory; } util_t;
static int inited;
int nvmlInit_v2(void) { inited = 1; return 0; }
int nvmlShutdown(void) { inited = 0; return 0; }
int nvmlDeviceGetCount_v2(unsigned int *n) { if (!inited) return 1; *n = 2; return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned int i, void **h) { *h = (void *)(long)(i + 1); return i < 2 ? 0 : 2; }
int nvmlDeviceGetName(void *h, char *b, unsigned int n) { strncpy(b, (long)h == 1 ? "Tesla T4" : "NVIDIA H100 80GB HBM3", n); return 0; }
int nvmlDeviceGetUUID(void *h, char *b, unsigned int n) { strncpy(b, (long)h == 1 ? "GPU-aaaa" : "GPU-bbbb", n); return 0; }
int nvmlDeviceGetMemoryInfo(void *h, mem_t *m) { m->total = (long)h == 1 ? 16106127360ULL : 85520809984ULL; m->used = 1048576ULL * 100; m->free = m->total - m->used; return 0; }
int nvmlDeviceGetUtilizationRates(void *h, util_t *u) { if ((long)h == 2) return 3; u->gpu = 42; u->memory = 1; return 0; }
"""


def test_nvml_through_ctypes(tmp_path: Path) -> None:
    """NVML read through a stand-in libnvidia-ml built here (no NVIDIA driver on this machine)."""
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler to build the stand-in NVML library")
    src, lib = tmp_path / "nvml.c", tmp_path / "libnvidia-ml.so.1"
    src.write_text(FAKE_NVML)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, timeout=60)
    d = detect_gpus(RecordedRunner(exc=FileNotFoundError()), nvml_library=str(lib))
    assert d.source == "nvml"
    assert d.gpus == (Gpu(0, "GPU-aaaa", "Tesla T4", 15360, 100, 42),
                      Gpu(1, "GPU-bbbb", "NVIDIA H100 80GB HBM3", 81559, 100, None))


def test_gpu_score_orders_generations() -> None:
    def g(name: str, mib: int) -> Gpu:
        return Gpu(0, "GPU-x", name, mib, 0, 0)

    h100, a100, t4 = g("NVIDIA H100 80GB HBM3", 81559), g("NVIDIA A100-SXM4-40GB", 40960), g("Tesla T4", 15360)
    assert (gpu_score(h100), gpu_score(a100), gpu_score(t4)) == (3186, 800, 75)
    assert gpu_score(g("Some Future GPU", 10240)) == 100  # unknown family: factor 1


def _gpus(*mib: int) -> list[Gpu]:
    return [Gpu(i, f"GPU-{i}", "x", m, 0, 0) for i, m in enumerate(mib)]


def test_inventory_counts_and_releases() -> None:
    inv = GpuInventory(_gpus(16384, 16384))
    a = inv.allocate(count=1)
    b = inv.allocate(count=1)
    assert sorted(a + b) == ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]
    with pytest.raises(AdmissionRefused) as exc:
        inv.allocate(count=1)
    assert exc.value.recoverable
    inv.release(a)
    inv.release(a)  # idempotent
    inv.release(["nvidia.com/gpu=7"])  # unknown: ignored
    assert inv.free() == a
    assert inv.allocate() == ()


def test_inventory_best_fit_keeps_big_gpus_free() -> None:
    inv = GpuInventory(_gpus(81920, 16384, 40960))
    assert inv.allocate(count=1, memory_gb=10) == ("nvidia.com/gpu=1",)
    assert inv.allocate(count=1, memory_gb=20) == ("nvidia.com/gpu=2",)
    with pytest.raises(AdmissionRefused):
        inv.allocate(count=2)
    assert inv.free() == ("nvidia.com/gpu=0",)


def test_inventory_by_memory_alone() -> None:
    inv = GpuInventory(_gpus(16384, 16384, 40960))
    assert inv.allocate(memory_gb=50) == ("nvidia.com/gpu=0", "nvidia.com/gpu=2")
    with pytest.raises(AdmissionRefused, match="16 GiB free"):
        inv.allocate(memory_gb=20)
    assert inv.allocate(memory_gb=8) == ("nvidia.com/gpu=1",)
    with pytest.raises(ValueError):
        inv.allocate(count=-1)


def test_inventory_never_hands_a_gpu_out_twice() -> None:
    inv = GpuInventory(_gpus(*([1024] * 8)))
    got: list[str] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(4):
            try:
                names = inv.allocate(count=1)
            except AdmissionRefused:
                continue
            with lock:
                got.extend(names)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(got) == len(set(got)) == 8
