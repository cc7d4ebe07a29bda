"""Telemetry: the NVML path with an injected fake NVML (never a real GPU), and the no-driver path."""

import logging
import time
from types import SimpleNamespace

import pytest

from fairness.core import telemetry
from fairness.core.telemetry import Telemetry


class FakeNVML:
    """The part of pynvml that Telemetry uses, with readings that change on every call."""

    NVML_CLOCK_SM = 1

    def __init__(self, devices=1):
        self.devices, self.calls, self.initialised = devices, 0, False

    def nvmlInit(self):
        self.initialised = True

    def nvmlShutdown(self):
        self.initialised = False

    def nvmlDeviceGetCount(self):
        return self.devices

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def nvmlDeviceGetUtilizationRates(self, h):
        assert self.initialised and h == ("gpu", 0)
        self.calls += 1
        return SimpleNamespace(gpu=90 + self.calls % 5, memory=40)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=30 << 30, total=80 << 30, free=50 << 30)

    def nvmlDeviceGetPowerUsage(self, h):
        return 412_500  # milliwatts

    def nvmlDeviceGetClockInfo(self, h, kind):
        assert kind == self.NVML_CLOCK_SM
        return 1980


class NoDriver(FakeNVML):
    def nvmlInit(self):
        raise RuntimeError("NVML Shared Library Not Found")  # what pynvml.NVMLError_LibraryNotFound says


def test_background_sampler_reads_nvml():
    fake = FakeNVML()
    with Telemetry(nvml=fake, interval_s=0.005) as tel:
        assert tel.available
        deadline = time.monotonic() + 10
        while len(tel.window(5)) < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        samples = tel.window(5)
        tel.report_estimate(1.0, 0.5)  # estimates are ignored while NVML is there
        assert tel.latest().source == "nvml" and tel.read().source == "nvml"
    assert len(samples) == 5 and not fake.initialised  # stopped and shut down
    s = samples[-1]
    assert s.source == "nvml" and 0.90 <= s.gpu_util <= 0.94 and s.mem_util == 0.40
    assert (s.mem_used_bytes, s.mem_total_bytes, s.power_w, s.sm_clock_mhz) == (30 << 30, 80 << 30, 412.5, 1980.0)
    assert [a.t for a in samples] == sorted(a.t for a in samples)
    assert 0.90 <= tel.mean_util(5) <= 0.94


def test_no_driver_says_so_once_and_serves_estimates(monkeypatch, caplog):
    monkeypatch.setattr(telemetry, "_warned_no_driver", False)
    with caplog.at_level(logging.WARNING, logger="fairness.core.telemetry"):
        first, second = Telemetry(nvml=NoDriver()), Telemetry(nvml=NoDriver())
    warnings = [r for r in caplog.records if "falls back to the engine's own estimate" in r.getMessage()]
    assert len(warnings) == 1 and "NVML Shared Library Not Found" in warnings[0].getMessage()
    assert not first.available and "no NVIDIA driver" in first.unavailable_reason
    assert first.start() is first and first._thread is None  # nothing to sample
    assert first.read() is None and first.mean_util() is None
    first.report_estimate(12.0, 0.75)
    first.report_estimate(13.0, 1.5)  # clipped to [0, 1]
    assert first.read().source == "estimate" and first.latest().gpu_util == 1.0
    assert first.mean_util(2) == pytest.approx(0.875)
    assert second.latest() is None
    first.stop()


def test_disabled_nvml_is_silent(caplog, monkeypatch):
    monkeypatch.setattr(telemetry, "_warned_no_driver", False)
    with caplog.at_level(logging.WARNING, logger="fairness.core.telemetry"):
        tel = Telemetry(nvml=False)
    assert caplog.records == [] and not tel.available


def test_bad_device_index_and_interval():
    with pytest.raises(ValueError, match="out of range: NVML sees 1 device"):
        Telemetry(device_index=3, nvml=FakeNVML())
    with pytest.raises(ValueError, match="interval_s"):
        Telemetry(interval_s=0, nvml=FakeNVML())
