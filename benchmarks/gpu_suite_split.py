"""Where an AR decode step's time goes, measured around the engine's own calls (it exposes no split).

``StepSplit`` wraps, for the duration of a ``with`` block, the engine's AR step, the model's forward (a
pre-hook), its LM head (``model.logits``), the sampler the engine calls, the slot table's finished-row
mask and the engine's sample-and-commit, and stamps the host clock (``perf_counter``) at each boundary;
on CUDA it also records a CUDA event there. Phases per decode step, prefill excluded:

* forward: the model's layers, the KV-cache commit and the LM head (host: to launch them on CUDA, to run
  them on the CPU);
* sampling: the per-row settings and uniforms (host numpy, copied to the device) and the sampler;
* commit: recording the tokens in the slot table and the finished-row mask (queued device work);
* host_sync: the step's one device-to-host transfer (the list of finished rows), which waits for every
  kernel queued so far, plus handing finished rows back;
* other: the rest of the step (the active rows' longest length, Python around the calls).

On CUDA the events give the same boundaries on the device's timeline; when the host launches slower
than the device runs, the device waits at each boundary and ``host_sync`` is near zero: the step is
bound by launch overhead. ``kernel_busy`` (``profile_kernels``) is the summed duration of the kernels the
device ran per decode step, from ``torch.profiler`` (``decode_kernels``): step time minus it is time the
device sat idle.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections import defaultdict
from typing import Self

import torch

import respec.engine.engine as engine_module
from respec.engine.slots import SlotTable

PHASES = ("forward", "sampling", "commit", "host_sync", "other")
# The phase an interval belongs to, by the mark that ends it.
ENDS = {"forward_start": "other", "forward_end": "forward", "sample_start": "sampling", "sample_end": "sampling",
        "mask_end": "commit", "commit_end": "host_sync", "end": "other"}


class StepSplit:
    def __init__(self, llm) -> None:
        self.engine, self.model = llm.engine, llm.model
        self.cuda = self.model.device.type == "cuda"
        self.in_step = False
        self.marks: list[tuple[str, float]] = []
        self.events: list[tuple[str, object]] = []
        self.host: list[dict[str, float]] = []  # per step: seconds per phase
        self.device_steps: list[list[tuple[str, object]]] = []

    def mark(self, name: str) -> None:
        if not self.in_step:
            return
        self.marks.append((name, time.perf_counter()))
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append((name, event))

    def _after(self, fn, name: str):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.mark(name)
            return out
        return wrapped

    def __enter__(self) -> Self:
        engine, model = self.engine, self.model
        real_step, real_sample, self._real_mask = engine._ar_step, engine_module.sample, SlotTable.finished_mask

        def ar_step(*args, **kwargs):
            self.in_step, self.marks, self.events = True, [], []
            self.mark("start")
            try:
                return real_step(*args, **kwargs)
            finally:
                self.mark("end")
                self.in_step = False
                self._close_step()

        def sample(*args, **kwargs):
            self.mark("sample_start")
            out = real_sample(*args, **kwargs)
            self.mark("sample_end")
            return out

        engine._ar_step = ar_step
        engine._sample_and_commit = self._after(engine._sample_and_commit, "commit_end")
        model.logits = self._after(model.logits, "forward_end")
        engine_module.sample = sample
        SlotTable.finished_mask = self._after(self._real_mask, "mask_end")
        self._hook = model.register_forward_pre_hook(lambda module, args: self.mark("forward_start"))
        self._real_sample = real_sample
        return self

    def __exit__(self, *exc) -> None:
        for name in ("_ar_step", "_sample_and_commit"):
            self.engine.__dict__.pop(name, None)
        self.model.__dict__.pop("logits", None)
        engine_module.sample = self._real_sample
        SlotTable.finished_mask = self._real_mask
        self._hook.remove()

    def _close_step(self) -> None:
        phases = defaultdict(float)
        for (_, start), (name, end) in itertools.pairwise(self.marks):
            phases[ENDS[name]] += end - start
        self.host.append(dict(phases))
        if self.cuda:
            self.device_steps.append(self.events)

    def summary(self) -> dict:
        """Mean milliseconds per decode step: host phases, the step's wall time, and on CUDA the device
        timeline's span of each phase."""
        if not self.host:
            return {}
        out = {f"{p}_ms": 1e3 * statistics.fmean(s.get(p, 0.0) for s in self.host) for p in PHASES}
        out["step_ms"] = sum(out[f"{p}_ms"] for p in PHASES)
        out["steps"] = len(self.host)
        if self.device_steps:
            torch.cuda.synchronize()
            spans = defaultdict(float)
            for events in self.device_steps:
                for (_, start), (name, end) in itertools.pairwise(events):
                    spans[ENDS[name]] += start.elapsed_time(end)
            out.update({f"device_{p}_ms": spans[p] / len(self.device_steps) for p in PHASES})
        return out


def profile_kernels(run) -> tuple[float, int]:
    """Run ``run()`` under ``torch.profiler`` (CUDA only): milliseconds of device work (kernels, copies)
    and how many there were."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    busy_us, kernels = 0.0, 0
    for event in prof.events():  # device-side work (kernels, copies) carries the CUDA device type
        annotation = "annotation" in str(getattr(event, "activity_type", "") or "")  # ranges, not work
        if event.device_type == torch.autograd.DeviceType.CUDA and not annotation:
            busy_us += event.time_range.elapsed_us()
            kernels += 1
    return busy_us / 1e3, kernels


def decode_kernels(generate, new_tokens: int) -> dict:
    """Device work per decode step: a generate of ``new_tokens`` minus one of a single token (the prefill
    and the first sample), over the ``new_tokens - 1`` decode steps between them."""
    one, one_count = profile_kernels(lambda: generate(1))
    many, many_count = profile_kernels(lambda: generate(new_tokens))
    steps = max(new_tokens - 1, 1)
    return {"kernel_busy_ms": (many - one) / steps, "kernels_per_step": (many_count - one_count) / steps}
