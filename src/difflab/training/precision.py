"""`precision: auto`: choose the training precision and memory layout by measuring, per machine.

Why measure: the same torch build on two 2-core CPUs ran a bf16 training step ~7x faster
than fp32 on one (AMX) and ~10x slower on the other (AVX2 only). No default may assume
either, so on the CPU a short probe times a forward + backward of the run's own network at
its own input shape in each candidate setting, and bf16 autocast is chosen only when it is
clearly faster (`BF16_MIN_GAIN`). On CUDA the rule is fixed: bf16-mixed where the GPU
supports bf16, else 16-mixed, channels_last.

The result is cached under `<cache_dir>/precision/`, keyed by the network and input shape,
and holds the machine it was measured on (CPU model, ISA flags, threads, torch version): a
cache written on another machine is re-measured, never trusted.

    decision = resolve("auto", "cpu", "auto", net, (64, 1, 28, 28), cache_dir=".cache")
    decision.precision, decision.channels_last, decision.summary()
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from difflab.metrics import report
from difflab.metrics.report import OutputWriteError

log = logging.getLogger("difflab.precision")

PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "64")
LAYOUTS = ("auto", True, False)
BF16_MIN_GAIN = 1.3        # bf16 must beat fp32 by this factor to be chosen on the CPU
CHANNELS_LAST_MIN_GAIN = 1.02  # channels_last must beat contiguous by this to be chosen
PROBE_BATCH = 16           # images per probe step (8 was too noisy: its ratios swung 1.1x-1.6x here)
# The candidates are timed in interleaved rounds, each keeping its best, so that a transient load
# (another process on a 2-core machine) slows one round of every candidate rather than deciding
# alone: one cached probe of the default network, taken beside another job, measured bf16 1.22x
# fp32 on Intel-AMX, where four later probes measured 1.51-1.69x.
PROBE_ROUNDS = 2
HOPELESS_BF16 = 0.5        # a bf16 matmul below this x fp32's: bf16 is not worth probing on the network
PROBE_SECONDS = 0.25       # timed steps per candidate last at least this long (after one warm-up) ...
PROBE_MAX_STEPS = 4        # ... or this many steps
SLOW_FIRST_STEP = 3.0      # a candidate whose first step takes this x fp32's first step is slow
CACHE_FORMAT = "difflab.precision/2"  # 2: interleaved rounds (a probe of format 1 is measured again)
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


class PrecisionError(ValueError):
    """An unknown precision or layout value; the message lists the allowed ones."""


def check_precision(value: Any, key: str = "trainer.precision") -> str:
    """`value` as a precision string, or PrecisionError naming the allowed values."""
    text = str(value)
    if text not in PRECISIONS:
        raise PrecisionError(f"{key}={value!r} is not a precision difflab knows; allowed: {', '.join(PRECISIONS)}")
    return text


def check_layout(value: Any, key: str = "channels_last") -> Any:
    if value not in LAYOUTS or isinstance(value, (int, float)) and not isinstance(value, bool):
        raise PrecisionError(f"{key}={value!r} is not allowed; use auto, true or false")
    return value


# -- the machine ------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def isa_flags() -> list[str]:
    """The instruction-set extensions that decide bf16 speed, as the kernel reports them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in _ISA_FLAGS if flag in present]
    except OSError:
        pass
    return []


def machine() -> dict[str, Any]:
    """What a probe result depends on besides the network: CPU, ISA, threads, torch."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return {"cpu": cpu_model(), "isa": isa_flags(), "torch_cpu_capability": capability,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


# -- the probe --------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    precision: str        # a Lightning precision string
    channels_last: bool

    @property
    def name(self) -> str:
        return f"{self.precision}/{'channels_last' if self.channels_last else 'contiguous'}"


FP32_NCHW, FP32_CL = Candidate("32-true", False), Candidate("32-true", True)
BF16_CL = Candidate("bf16-mixed", True)


def autocast_dtype(precision: Optional[str]) -> Optional[torch.dtype]:
    """The autocast dtype of a mixed precision, None for the others (float32 and friends)."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def time_candidate(net: nn.Module, shape: Sequence[int], candidate: Candidate, *,
                   cond: Optional[torch.Tensor] = None, fp32_first: Optional[float] = None,
                   backward: bool = True) -> tuple[float, float]:
    """(first step, fastest timed step) in seconds, one step being a forward + backward of
    `net` on `shape` in `candidate`'s setting (with `backward=False`: one eval-mode forward
    without gradients, what a sampler step costs). The first step pays for kernel selection, so
    it is only compared with fp32's first step: when it alone takes `SLOW_FIRST_STEP` times
    as long, the candidate is clearly slower and is not measured further (a bf16 that runs
    at a tenth of fp32 is not worth more seconds)."""
    model = copy.deepcopy(net).train(backward)
    memory_format = torch.channels_last if candidate.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator).contiguous(memory_format=memory_format)
    t = torch.randint(0, 1000, (shape[0],), generator=generator)
    dtype = autocast_dtype(candidate.precision)

    def step() -> float:
        start = time.perf_counter()
        with torch.set_grad_enabled(backward), \
                torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(x, t, cond) if cond is not None else model(x, t)
        if backward:
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    first = step()
    if fp32_first is not None and first >= SLOW_FIRST_STEP * fp32_first:
        return first, first
    times: list[float] = []
    while len(times) < PROBE_MAX_STEPS and (len(times) < 1 or sum(times) < PROBE_SECONDS):
        times.append(step())
    return first, min(times)


def probe(net: nn.Module, shape: Sequence[int], candidates: Sequence[Candidate], *,
          cond: Optional[torch.Tensor] = None,
          timer: Callable[..., tuple[float, float]] = time_candidate, batch: int = PROBE_BATCH) -> dict[str, float]:
    """Images per second of each candidate (its best over `PROBE_ROUNDS` interleaved rounds),
    at a batch of at most `batch`; fp32 first in each round: it is the yardstick. A candidate
    under half the best rate after the first round is clearly slower and is not timed again."""
    batch_shape = (min(int(shape[0]), batch), *shape[1:])
    rates: dict[str, float] = {}
    fp32_first = None
    order = sorted(candidates, key=lambda c: c.precision != "32-true")
    for round_ in range(PROBE_ROUNDS):
        if round_:
            order = [c for c in order if rates[c.name] >= 0.5 * max(rates.values())]
        for candidate in order:
            first, seconds = timer(net, batch_shape, candidate, cond=_first_rows(cond, batch_shape[0]),
                                   fp32_first=None if candidate.precision == "32-true" else fp32_first)
            if candidate.precision == "32-true":
                fp32_first = first if fp32_first is None else min(fp32_first, first)
            rates[candidate.name] = max(rates.get(candidate.name, 0.0), batch_shape[0] / seconds)
    return rates


def _first_rows(cond: Any, n: int) -> Any:
    """The conditions of the first n images: labels, or a dict of condition tensors."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {key: value[:n] for key, value in cond.items()}
    return cond[:n]


def matmul_gain(n: int = 256, repeats: int = 5) -> float:
    """bf16 over fp32 speed of an n x n matmul: a ~50 ms check that tells a CPU without bf16
    arithmetic (AVX2: ~0.01x) from one with it (AVX512-BF16, AMX: 2-7x) before the network
    probe spends seconds on a hopeless bf16 step."""
    generator = torch.Generator().manual_seed(0)  # never the global stream: a seeded run must not
    # depend on whether its probe ran or came from the cache

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(n, n, generator=generator).to(dtype)
        a @ a
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        return min(times)
    return best(torch.float32) / best(torch.bfloat16)


# -- the decision -----------------------------------------------------------------------
@dataclass
class Decision:
    """What a run trains in, and why."""

    precision: str
    channels_last: bool
    requested: dict[str, Any]
    device: str
    source: str                    # probe | cache | rule | requested
    rates: dict[str, float] = field(default_factory=dict)   # img/s per candidate, from the probe
    warnings: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    probe_seconds: Optional[float] = None
    bf16_matmul_gain: Optional[float] = None  # the quick matmul check, where it ran

    def ratio(self, precision: str, fp32: str = "32-true") -> Optional[float]:
        """Best measured img/s of `precision` over the best of `fp32`, over both layouts; for
        a bf16 that the matmul check found hopeless (so the network never ran it), that gain."""
        def best(p: str) -> Optional[float]:
            values = [r for name, r in self.rates.items() if name.split("/")[0] == p]
            return max(values) if values else None
        a, b = best(precision), best(fp32)
        if a is None and precision.startswith("bf16"):
            return self.bf16_matmul_gain
        return None if a is None or b is None else a / b

    def summary(self) -> str:
        layout = "channels_last" if self.channels_last else "contiguous"
        text = f"precision {self.precision}, {layout} on {self.device} ({self.source}"
        if self.rates:
            text += "; probe img/s " + ", ".join(f"{k} {v:.1f}" for k, v in self.rates.items())
        if self.bf16_matmul_gain is not None and not any(k.startswith("bf16") for k in self.rates):
            text += f"; bf16 matmul at {self.bf16_matmul_gain:.2f}x fp32, not worth a probe"
        return text + ")"

    def record(self) -> dict[str, Any]:
        return asdict(self)


def _signature(net: nn.Module, shape: Sequence[int], probe_batch: int = PROBE_BATCH) -> str:
    """The probe's cache key: the network's structure and parameter shapes, the input shape and
    the batch the probe runs at (the smaller of the two batches)."""
    text = repr(net) + repr([tuple(p.shape) for p in net.parameters()]) + repr(tuple(shape[1:]))
    text += f"batch={min(int(shape[0]), probe_batch)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(cache_dir: str | Path, net: nn.Module, shape: Sequence[int], kind: str = "train",
               probe_batch: int = PROBE_BATCH) -> Path:
    """Where the probe result for this network, input shape and probe batch is cached."""
    return Path(cache_dir) / "precision" / f"{kind}-{_signature(net, shape, probe_batch)}.json"


def _read_cache(path: Path, here: dict[str, Any]) -> dict[str, Any]:
    """The cached probe record ({} if none, unreadable, or measured on another machine)."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("precision probe cache %s is unreadable; measuring again", path)
        return {}
    if record.get("format") != CACHE_FORMAT:
        log.info("precision probe cache %s was written by another version of the probe (%s, now %s); measuring "
                 "again", path, record.get("format"), CACHE_FORMAT)
        return {}
    if record.get("machine") != here:
        theirs = record.get("machine", {})
        log.info("precision probe cache %s was measured on another machine or torch (%s, %s threads, torch %s); "
                 "measuring again", path, theirs.get("cpu"), theirs.get("threads"), theirs.get("torch"))
        return {}
    return record


def _write_cache(path: Path, here: dict[str, Any], rates: dict[str, float], gain: Optional[float]) -> None:
    record = {"format": CACHE_FORMAT, "machine": here, "rates": rates, "bf16_matmul_gain": gain}
    try:
        report.write_text(path, json.dumps(record, indent=1) + "\n")
    except OutputWriteError as error:  # a read-only cache only costs the next run a probe
        log.warning("could not cache the precision probe at %s: %s", path, error)


def cuda_precision() -> str:
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def device_kind(accelerator: Any) -> str:
    """cuda or cpu: where a Lightning `accelerator` setting will train."""
    name = str(accelerator).lower()
    if name in ("gpu", "cuda"):
        return "cuda"
    if name == "auto" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def resolve(precision: Any, accelerator: Any, channels_last: Any, net: nn.Module, shape: Sequence[int], *,
            cache_dir: Optional[str | Path] = None, cond: Optional[torch.Tensor] = None,
            timer: Callable[..., tuple[float, float]] = time_candidate, kind: str = "train",
            bf16_check: Optional[Callable[[], float]] = None, probe_batch: int = PROBE_BATCH) -> Decision:
    """Decide precision and layout for training `net` on batches of `shape` [B, C, H, W].

    Explicit settings win; `auto` ones are decided here. On the CPU an explicit bf16-mixed
    (or 16-mixed, which Lightning runs as bf16-mixed on the CPU) is still measured, and runs
    with a warning giving the measured ratio when it is slower than fp32.
    """
    requested = {"precision": check_precision(precision), "channels_last": check_layout(channels_last)}
    device = device_kind(accelerator)
    if device == "cuda":
        chosen = cuda_precision() if requested["precision"] == "auto" else requested["precision"]
        layout = True if channels_last == "auto" else bool(channels_last)
        return Decision(chosen, layout, requested, device, "rule" if "auto" in requested.values() else "requested")

    asked = requested["precision"]
    warnings = []
    if asked == "16-mixed":
        warnings.append("precision 16-mixed is not available on the CPU (no fp16 autocast there); "
                        "Lightning runs bf16-mixed instead")
        asked = "bf16-mixed"
    wants_bf16 = asked in ("auto", "bf16-mixed", "bf16-true")
    candidates = [FP32_NCHW, FP32_CL] if channels_last == "auto" else [Candidate("32-true", bool(channels_last))]
    if wants_bf16:
        candidates.append(Candidate("bf16-mixed", True if channels_last == "auto" else bool(channels_last)))
    if not wants_bf16 and channels_last != "auto":
        return Decision(asked, bool(channels_last), requested, device, "requested", warnings=warnings)

    here = machine()
    path = cache_path(cache_dir, net, shape, kind, probe_batch) if cache_dir is not None else None
    cached = _read_cache(path, here) if path is not None else {}
    rates, gain = dict(cached.get("rates") or {}), cached.get("bf16_matmul_gain")
    source, seconds, start = "cache", None, time.perf_counter()
    if asked == "auto" and any(c.name not in rates for c in candidates if c.precision != "32-true"):
        if gain is None:
            gain, source = (bf16_check or matmul_gain)(), "probe"
        if gain < HOPELESS_BF16:  # an explicit bf16 is still measured on the network, for its warning
            candidates = [c for c in candidates if c.precision == "32-true"]
    missing = [c for c in candidates if c.name not in rates]
    if missing:
        rates.update(probe(net, shape, missing, cond=cond, timer=timer, batch=probe_batch))
        source = "probe"
    if source == "probe":
        seconds = round(time.perf_counter() - start, 2)
        if path is not None:
            _write_cache(path, here, rates, gain)
    decision = Decision(asked, True, requested, device, source, rates, warnings, here, seconds, gain)

    fp32_layouts = {c.channels_last: rates[c.name] for c in candidates if c.precision == "32-true"}
    best_fp32_layout = max(fp32_layouts, key=fp32_layouts.get)
    if len(fp32_layouts) == 2 and best_fp32_layout and fp32_layouts[True] < CHANNELS_LAST_MIN_GAIN * fp32_layouts[False]:
        best_fp32_layout = False  # a tie is no reason to convert every batch
    bf16_gain = decision.ratio("bf16-mixed")
    if asked == "auto":
        use_bf16 = bf16_gain is not None and bf16_gain >= BF16_MIN_GAIN
        decision.precision = "bf16-mixed" if use_bf16 else "32-true"
    elif bf16_gain is not None and bf16_gain < 1.0:
        warnings.append(f"precision {asked} was asked for, but on this CPU ({here['cpu']}) it measured "
                        f"{bf16_gain:.2f}x the speed of 32-true; training will be about {1 / bf16_gain:.1f}x slower. "
                        "Leave trainer.precision at auto (or set 32-true) to train in float32")
    if channels_last == "auto":
        decision.channels_last = True if decision.precision != "32-true" else best_fp32_layout
    else:
        decision.channels_last = bool(channels_last)
    return decision

