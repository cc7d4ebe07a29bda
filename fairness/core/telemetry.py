"""GPU telemetry for the scheduler: utilisation, memory, power and SM clock read through NVML (`pynvml`, from the
`nvidia-ml-py` distribution) by a background sampler, so a scheduling decision never waits on the driver.

Without an NVIDIA driver (or with `nvml=False`, as in the simulator) it says so once and serves the engine's own
estimate instead, which the engine (or the simulator) pushes with `report_estimate`. Every sample names its source.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
_warned_no_driver = False  # "says so once" per process


@dataclass(frozen=True)
class GPUSample:
    """One reading. Utilisations are fractions in [0, 1]; `source` is "nvml" or "estimate"."""

    t: float  # time.monotonic() of the reading, or the simulated time for estimates
    gpu_util: float  # NVML utilization.gpu: fraction of the period a kernel ran (estimate: modelled compute share)
    mem_util: float  # NVML utilization.memory: fraction of the period device memory was read or written
    mem_used_bytes: int
    mem_total_bytes: int
    power_w: float
    sm_clock_mhz: float
    source: str


class Telemetry:
    """Background NVML sampler for one GPU with an estimate fallback.

    nvml: the NVML binding (default: `import pynvml`); tests inject a fake. `nvml=False` never touches NVML (for
    simulations). interval_s: sampling period. history: how many samples `window()` can look back over.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.1, nvml: Any = None, history: int = 600):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.device_index, self.interval_s = device_index, interval_s
        self._samples: deque[GPUSample] = deque(maxlen=history)
        self._estimate: GPUSample | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml, self._handle = None, None
        self.unavailable_reason: str | None = None
        if nvml is False:
            self.unavailable_reason = "NVML disabled (nvml=False)"
        else:
            self._open(nvml)

    def _open(self, nvml: Any) -> None:
        global _warned_no_driver
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            if not 0 <= self.device_index < count:
                nvml.nvmlShutdown()
                raise ValueError(f"GPU index {self.device_index} out of range: NVML sees {count} device(s)")
            self._handle = nvml.nvmlDeviceGetHandleByIndex(self.device_index)
            self._nvml = nvml
        except ValueError:
            raise
        except Exception as e:  # pynvml.NVMLError (no driver, no library, no permission) or a missing binding
            self.unavailable_reason = f"no NVIDIA driver reachable through NVML ({type(e).__name__}: {e})"
            if not _warned_no_driver:
                log.warning("%s; GPU telemetry falls back to the engine's own estimate", self.unavailable_reason)
                _warned_no_driver = True

    @property
    def available(self) -> bool:
        """True when readings come from NVML."""
        return self._nvml is not None

    def read(self) -> GPUSample | None:
        """One synchronous reading: NVML when available, else the latest estimate (None before any)."""
        if self._nvml is None:
            with self._lock:
                return self._estimate
        nv, h = self._nvml, self._handle
        util = nv.nvmlDeviceGetUtilizationRates(h)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        return GPUSample(
            t=time.monotonic(),
            gpu_util=util.gpu / 100.0,
            mem_util=util.memory / 100.0,
            mem_used_bytes=int(mem.used),
            mem_total_bytes=int(mem.total),
            power_w=nv.nvmlDeviceGetPowerUsage(h) / 1000.0,  # NVML reports milliwatts
            sm_clock_mhz=float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
            source="nvml",
        )

    def report_estimate(self, t: float, gpu_util: float, mem_used_bytes: int = 0, mem_total_bytes: int = 0) -> None:
        """The engine's (or simulator's) own estimate, served while NVML is unavailable; ignored when it is."""
        sample = GPUSample(t, min(max(gpu_util, 0.0), 1.0), 0.0, mem_used_bytes, mem_total_bytes, 0.0, 0.0, "estimate")
        with self._lock:
            self._estimate = sample
            if self._nvml is None:
                self._samples.append(sample)

    def latest(self) -> GPUSample | None:
        """The newest sample (from the background sampler, or the newest estimate)."""
        with self._lock:
            return self._samples[-1] if self._samples else self._estimate

    def window(self, n: int) -> list[GPUSample]:
        """The newest `n` samples, oldest first."""
        with self._lock:
            return list(self._samples)[-n:]

    def mean_util(self, n: int = 10) -> float | None:
        """Mean gpu_util of the newest `n` samples (None before any)."""
        got = self.window(n)
        return sum(s.gpu_util for s in got) / len(got) if got else None

    def start(self) -> Telemetry:
        """Start the background sampler (a no-op without NVML: estimates arrive by `report_estimate`)."""
        if self._nvml is None or self._thread is not None:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fairness-telemetry", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sample = self.read()
            except Exception as e:  # a driver error mid-run: stop sampling, keep the last readings
                log.warning("NVML read failed (%s: %s); telemetry sampling stopped", type(e).__name__, e)
                return
            with self._lock:
                self._samples.append(sample)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        """Stop the sampler and release NVML. Safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None

    def __enter__(self) -> Telemetry:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
