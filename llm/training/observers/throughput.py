"""Throughput and model FLOPs utilisation (MFU): the `ThroughputMonitor` callback and what it needs.

Model FLOPs per token come from `llm.models.flops.flops_per_token` (6 * N_active + 12 * n_layers * d_attn * seq_len;
its docstring says what each term counts), so MFU here and in the benchmarks is one formula.

Peaks are per device. GPUs: the dense (no sparsity) bf16 tensor-core peak from the vendor's datasheet,
looked up by device name; an fp32 run is measured against the same bf16 peak, as torchtitan does. CPUs have
no useful datasheet number, so the peak is measured: the best of a few large matmuls in the run's compute
dtype, once per process (per dtype and thread count). ``LLM_PEAK_TFLOPS`` overrides either.

`ThroughputMonitor` publishes, at every log step (the logs that carry ``train/tokens_per_s``):
``perf/tokens_per_s_per_device``, ``perf/tflops_per_device`` and ``perf/mfu`` (in percent), through the engine's
metrics channel (`self.engine.log`), so every logger records them once, whatever the callback order.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from llm.models.flops import flops_per_token
from llm.training.observers.hooks import Callback
from llm.training.optim.precision import compute_dtype

# Dense bf16 tensor-core peaks in TFLOP/s (datasheets, without 2:4 sparsity). Matched as substrings of the
# upper-cased device name, longest key first, so "L40S" wins over "L40" and "L4", "H100 PCIE" over "H100".
GPU_PEAK_TFLOPS: dict[str, float] = {
    "GB200": 2500.0,
    "B200": 2250.0,
    "H200": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIE": 756.0,
    "H100": 989.4,  # SXM / HBM3
    "H800": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.05,
    "L40": 181.05,
    "L4": 121.0,
    "RTX 4090": 165.2,
    "MI300X": 1307.4,
    "MI250X": 383.0,
}

_CPU_PEAK_CACHE: dict[tuple[torch.dtype, int], float] = {}


def gpu_peak_flops(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its name (`torch.cuda.get_device_name()`), None if unknown."""
    upper = name.upper()
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key in upper:
            return GPU_PEAK_TFLOPS[key] * 1e12
    return None


def measured_cpu_peak_flops(dtype: torch.dtype = torch.float32, sizes: tuple[int, ...] = (512, 1024),
                            repeats: int = 8) -> float:
    """Best FLOP/s of square matmuls of `sizes` on this CPU, measured once per process (per dtype and threads).

    Best-of (not the median): the peak is what the hardware can do, and a shared machine only ever slows a
    sample down. Two sizes, because the fastest one depends on the caches. Takes well under a second.
    """
    key = (dtype, torch.get_num_threads())
    if key not in _CPU_PEAK_CACHE:
        gen = torch.Generator().manual_seed(0)
        best = 0.0
        for size in sizes:
            a = torch.randn(size, size, generator=gen).to(dtype)
            b = torch.randn(size, size, generator=gen).to(dtype)
            torch.mm(a, b)  # warm-up: thread pool, kernel selection
            for _ in range(repeats):
                began = time.perf_counter()
                torch.mm(a, b)
                best = max(best, 2 * size**3 / max(time.perf_counter() - began, 1e-9))
        _CPU_PEAK_CACHE[key] = best
    return _CPU_PEAK_CACHE[key]


def device_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak FLOP/s of one device: ``LLM_PEAK_TFLOPS`` if set, else the GPU table or the measured CPU peak."""
    override = os.environ.get("LLM_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return measured_cpu_peak_flops(dtype)
    return None


class ThroughputMonitor(Callback):
    """Logs tokens/s per device, achieved TFLOP/s per device and MFU (%) at every log step.

    ``peak_tflops`` overrides the device's peak (e.g. for a GPU missing from `GPU_PEAK_TFLOPS`).
    """

    def __init__(self, peak_tflops: float | None = None) -> None:
        self.peak_tflops = peak_tflops
        self.peak_flops: float | None = None
        self._model: nn.Module | None = None
        self.last: dict[str, float] = {}
        self._said_no_tokens = False

    def on_train_start(self, logs: dict[str, Any] | None = None) -> None:
        engine = self.engine
        self._model = engine.model
        dtype = compute_dtype(getattr(engine.config.training, "precision", "fp32"))
        if self.peak_tflops:
            self.peak_flops = self.peak_tflops * 1e12
        else:
            self.peak_flops = device_peak_flops(engine.device, dtype)
        if self.peak_flops is None and engine.is_global_zero:
            engine.logger.warning("ThroughputMonitor: unknown peak FLOP/s for %s; set LLM_PEAK_TFLOPS to get MFU",
                                  engine.device)

    def compute(self, logs: dict[str, Any]) -> dict[str, float]:
        """The perf/* values for one log step's `logs` (empty if the step has no token throughput)."""
        tokens_per_s = logs.get("train/tokens_per_s")
        if not tokens_per_s:
            return {}
        world = max(1, self.engine.world_size)
        per_device = float(tokens_per_s) / world
        # Tokens per sample is the sequence length of the window's batches.
        seq_len = float(tokens_per_s) / max(float(logs.get("train/samples_per_s") or tokens_per_s), 1e-9)
        flops = flops_per_token(self._model, seq_len)
        perf = {"perf/tokens_per_s_per_device": per_device, "perf/tflops_per_device": per_device * flops / 1e12}
        if self.peak_flops:
            perf["perf/mfu"] = 100.0 * per_device * flops / self.peak_flops
        return perf

    def on_batch_end(self, logs: dict[str, Any] | None = None) -> None:
        perf = self.compute(logs) if logs else {}
        if perf:
            self.last = perf
            self.engine.log(perf, int(logs.get("step", self.engine.state.step)))
        elif logs and "train/samples_per_s" in logs:
            self._say_no_tokens()

    def _say_no_tokens(self) -> None:
        """Say once why nothing is logged: the engine counts tokens only where a batch's first tensor holds integer
        ids, which is only known once a window of batches has been seen (the first log step)."""
        if self._said_no_tokens or not self.engine.is_global_zero:
            return
        self._said_no_tokens = True
        self.engine.logger.warning(
            "ThroughputMonitor: the %r task's batches hold no token ids (the first tensor of a batch is not "
            "integer), so it logs no tokens/s, TFLOP/s or MFU; train/samples_per_s is this run's throughput",
            getattr(self.engine.config, "task", "?"),
        )
