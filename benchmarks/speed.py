"""Cost of ProsPr scoring relative to one plain training step: wall time and peak extra memory.

Run from the repository root::

    python benchmarks/speed.py                                   # 3 models, batch 128, M=3
    python benchmarks/speed.py --models resnet20 --repeats 3     # the ResNet-20 headline table
    python benchmarks/speed.py --sweep                           # ResNet-20, M x batch scaling
    python benchmarks/speed.py --profile                         # torch.profiler, ResNet-20 full
    python benchmarks/speed.py --quick                           # smoke test (~40 s on 2 cores)

What is measured, for each model and batch size (random CIFAR-shaped images, 10 classes, or random
tokens for the Transformer; cross-entropy loss ``loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1])``):

* **train step**: the baseline, one plain SGD step (``zero_grad``, forward, backward,
  ``optimizer.step``) on the same model and batch.
* **full**: `prospr_scores(..., steps=M)`, meta-gradients through `M` unrolled steps.
* **first_order**: `prospr_scores(..., steps=M, mode="first_order")`.
* **snip**: `snip_scores(...)` (ProsPr's engine with no inner step).
* **recompute** (only when asked for with `--methods`): `prospr_scores(..., steps=M,
  mode="recompute")`, the full-mode scores in bounded memory.

``--models resnet20-nobn`` adds an ablation: ResNet-20 with every BatchNorm replaced by
``nn.Identity``, to measure what train-mode BatchNorm's second derivative costs.

Time: every (model, batch) runs in one fresh worker process that times the train step and the
scoring calls *in the same process*: one warm-up call of each operation, then ``--repeats`` timed
calls, each paired with a train step timed right before it (so slow drift in machine load affects
both alike) after an untimed one (so that it runs in steady state, not re-faulting the memory the
previous scoring call gave back). ``seconds`` is the median of the timed calls; ``ratio`` divides
it by the median of the train steps paired with it. ``best s`` is the fastest timed call and
``best ratio`` divides it by the fastest train step of the worker: on a shared machine, where other
processes take cores for a while, the minimum is the steadier estimate of the intrinsic cost (as
:mod:`timeit` advises).
``CPU s`` is the median CPU time of the process (all threads, :func:`time.process_time`) and
``CPU ratio`` divides it by the paired train steps' median: with ``--threads 1`` it counts the work
done whatever else runs on the machine (with more threads it also counts OpenMP spin-waiting).

Memory: peak resident memory *above* the process's baseline, one fresh worker process per
operation: the worker builds the model and batch, warms up the libraries with a no-grad
eval-mode forward pass (which does not reach the operation's peak), reads its current RSS from
``/proc/self/statm``, runs the operation once, and reads the high-water mark
``resource.getrusage(RUSAGE_SELF).ru_maxrss``. ``peak extra MB`` is the difference, and ``kept MB``
the RSS still above the baseline once the operation has returned. If the
operation did not raise the high-water mark set before it, the value is only a lower bound and is
printed as ``<=value``. ``live peak MB`` is allocator-independent: a second call of the operation
under ``torch.profiler(profile_memory=True)``, summing its tensor allocations and frees in time
order (the CPU counterpart of ``torch.cuda.max_memory_allocated``); glibc's malloc keeps freed
activation blocks, so the RSS peak can be up to twice the live one. ``--allocator tcmalloc`` (or
``jemalloc``) runs the workers with that library in ``LD_PRELOAD``; the header names the allocator
the workers actually loaded. On CUDA the worker also reports the time with
``torch.cuda.synchronize`` and ``torch.cuda.max_memory_allocated`` minus the memory allocated
before the operation (after ``torch.cuda.reset_peak_memory_stats``).

Workers import the engine from this checkout (`import lightning_prospr` does not import
Lightning).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common.timing import sync, timed

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("resnet20", "vgg16bn", "transformer", "resnet20-nobn")
#: The models run when ``--models`` is not given (``resnet20-nobn`` is an ablation, on request).
DEFAULT_MODELS = ("resnet20", "vgg16bn", "transformer")
#: ``resnet20-nobn`` scales its initial weights by this so that 8 SGD steps at lr 0.1 stay finite.
NOBN_WEIGHT_SCALE = 0.5
METHODS = ("full", "first_order", "snip", "recompute")
DEFAULT_METHODS = ("full", "first_order", "snip")
TRAIN = "train step"
RESULT_PREFIX = "SPEED-RESULT "


# --------------------------------------------------------------------------------------------------
# Worker side: runs in a fresh process, imports torch.
# --------------------------------------------------------------------------------------------------


def _import_engine() -> tuple[Any, Any, Any]:
    """`(prospr_scores, snip_scores, models module)` of this checkout."""
    from lightning_prospr import models, prospr_scores, snip_scores

    return prospr_scores, snip_scores, models


def _build(model_name: str, batch_size: int, device: Any, seed: int = 0) -> tuple[Any, Any]:
    """The model (train mode) and one ``(inputs, targets)`` batch on ``device``."""
    import torch

    _, _, models = _import_engine()
    torch.manual_seed(seed)
    if model_name in ("resnet20", "resnet20-nobn"):
        model = models.ResNet20(num_classes=10)
        if model_name == "resnet20-nobn":  # ablation: what BatchNorm costs (every BN -> Identity)
            for module in list(model.modules()):
                for name, child in list(module.named_children()):
                    if isinstance(child, torch.nn.BatchNorm2d):
                        setattr(module, name, torch.nn.Identity())
            with torch.no_grad():  # without normalization the default init diverges at lr 0.1
                for param in model.parameters():
                    param.mul_(NOBN_WEIGHT_SCALE)
        batch = (torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,)))
    elif model_name == "vgg16bn":
        model = models.VGG16BN(num_classes=10)
        batch = (torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,)))
    elif model_name == "transformer":
        model = models.TinyTransformerEncoder(vocab_size=1000, d_model=128, nhead=4, num_layers=2)
        batch = (torch.randint(0, 1000, (batch_size, 64)), torch.randint(0, 2, (batch_size,)))
    else:
        raise ValueError(f"unknown model {model_name!r}; choose from {MODELS}")
    model = model.to(device).train()
    return model, tuple(t.to(device) for t in batch)


def _loss_fn(model: Any, batch: Any) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(model(batch[0]), batch[1])


class TrainStep:
    """One plain SGD step (zero_grad, forward, backward, step) on a copy of the model.

    The copy keeps the scored model at its initial weights; :meth:`reset` (called outside the
    timed region) puts the copy back to them, so that repeated steps at lr 0.1 on random data never
    drift far.
    """

    def __init__(self, model: Any, batch: Any) -> None:
        import copy

        import torch

        self.model = copy.deepcopy(model)
        self.batch = batch
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.initial = copy.deepcopy(self.model.state_dict())

    def __call__(self) -> None:
        self.optimizer.zero_grad()
        _loss_fn(self.model, self.batch).backward()
        self.optimizer.step()

    def reset(self) -> None:
        self.model.load_state_dict(self.initial)


def _operation(op: str, steps: int, model: Any, batch: Any) -> Callable[[], Any]:
    """A zero-argument callable that performs ``op`` once."""
    if op == TRAIN:
        return TrainStep(model, batch)
    prospr_scores, snip_scores, _ = _import_engine()
    if op == "full":
        return lambda: prospr_scores(model, _loss_fn, [batch], steps=steps)
    if op == "first_order":
        return lambda: prospr_scores(model, _loss_fn, [batch], steps=steps, mode="first_order")
    if op == "snip":
        return lambda: snip_scores(model, _loss_fn, [batch])
    if op == "recompute":  # full mode by a reverse sweep that rebuilds one step at a time
        return lambda: prospr_scores(model, _loss_fn, [batch], steps=steps, mode="recompute")
    raise ValueError(f"unknown method {op!r}; choose from {METHODS}")


def _current_rss_kib() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 1024


def _peak_rss_kib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform != "darwin" else peak / 1024)  # bytes on macOS


def _live_peak_mib(op: Callable[[], Any]) -> float:
    """Peak of live CPU tensor memory during one call of ``op``, above what was live before it (MiB).

    Sums ``torch.profiler``'s allocation and free events (``profile_memory=True``) in time order:
    the CPU counterpart of ``torch.cuda.max_memory_allocated``. Unlike the RSS it does not count
    memory the C allocator keeps after ``free`` (glibc's heap holds freed activation buffers), so it
    is the same whatever allocator the process uses.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        op()
    events = [
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    ]
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):  # stable: same-time events keep their order
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def _allocator() -> str:
    """The C allocator this process uses: tcmalloc or jemalloc if one is loaded, else the system's."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc"):
        if name in maps:
            return name
    return "system (glibc malloc)" if sys.platform.startswith("linux") else "system"


def _environment(device: Any) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "allocator": _allocator(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _time_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time the train step and each ``(method, steps)`` op in this process."""
    import torch

    device = torch.device(spec["device"])
    model, batch = _build(spec["model"], spec["batch"], device)
    train = TrainStep(model, batch)
    train()  # warm-up
    results = []
    all_train: list[float] = []
    all_train_cpu: list[float] = []
    for method, steps in spec["ops"]:
        op = _operation(method, steps, model, batch)
        op()  # warm-up
        op_times, train_times, op_cpu, train_cpu = [], [], [], []
        for _ in range(spec["repeats"]):
            # An untimed step first: after the op, the process may have given its memory back to the
            # system (scoring ends with malloc_trim on CPU), and the step that faults it in again is
            # not a steady-state training step.
            train.reset()
            train()
            train.reset()
            wall, cpu = timed(train, device)
            train_times.append(wall)
            train_cpu.append(cpu)
            wall, cpu = timed(op, device)
            op_times.append(wall)
            op_cpu.append(cpu)
        all_train += train_times
        all_train_cpu += train_cpu
        results.append(
            {
                "method": method,
                "steps": steps,
                "seconds": statistics.median(op_times),
                "times": op_times,
                "cpu_seconds": statistics.median(op_cpu),
                "train_seconds": statistics.median(train_times),
                "train_times": train_times,
                "train_cpu_seconds": statistics.median(train_cpu),
            }
        )
    if not all_train:
        train.reset()
        wall, cpu = timed(train, device)
        all_train, all_train_cpu = [wall], [cpu]
    return {
        "env": _environment(device),
        "train_seconds": statistics.median(all_train),
        "train_best": min(all_train),
        "train_cpu_seconds": statistics.median(all_train_cpu),
        "ops": results,
    }


def _memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory above baseline of one op, the first time it runs in this process."""
    import torch

    device = torch.device(spec["device"])
    model, batch = _build(spec["model"], spec["batch"], device)
    method, steps = spec["op"]
    op = _operation(method, steps, model, batch)
    # Library warm-up (thread pool, oneDNN forward primitives) well below the op's peak.
    model.eval()
    with torch.no_grad():
        model(batch[0])
    model.train()
    sync(device)
    result: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    peak_before = _peak_rss_kib()
    rss_before = _current_rss_kib()
    op()
    sync(device)
    peak_after = _peak_rss_kib()
    result["kept_mb"] = (_current_rss_kib() - rss_before) / 1024
    result["rss_before_mb"] = rss_before / 1024
    result["peak_extra_mb"] = (peak_after - rss_before) / 1024
    # ru_maxrss is a high-water mark: if the op never rose above the mark set before it, the
    # difference only bounds the op's peak from below.
    result["lower_bound"] = peak_after <= peak_before
    if device.type == "cuda":
        result["cuda_peak_extra_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_before) / 2**20
    elif spec.get("live", True):
        if isinstance(op, TrainStep):
            op.reset()
        result["live_peak_mb"] = _live_peak_mib(op)  # a second call, under the profiler
    result["env"] = _environment(device)
    return result


def _profile_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Print torch.profiler tables (self CPU time, then self CPU memory) for one op."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(spec["device"])
    model, batch = _build(spec["model"], spec["batch"], device)
    method, steps = spec["op"]
    op = _operation(method, steps, model, batch)
    op()  # warm-up
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    title = f"{spec['model']} {method} M={steps} batch={spec['batch']}"
    with profile(activities=activities) as prof:
        sync(device)
        op()
        sync(device)
    print(f"\n### torch.profiler: {title}, top {spec['rows']} ops by self CPU time\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=spec["rows"]))
    with profile(activities=activities, profile_memory=True) as prof:
        op()
        sync(device)
    print(f"\n### torch.profiler: {title}, top {spec['rows']} ops by self CPU memory allocated\n")
    print(
        prof.key_averages().table(
            sort_by="self_cpu_memory_usage", row_limit=spec["rows"], max_name_column_width=50
        )
    )
    return {"env": _environment(device)}


def worker_main(spec_json: str) -> None:
    import torch

    spec = json.loads(spec_json)
    if spec["device"] == "auto":
        spec["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    kind = spec["kind"]
    result = {"time": _time_worker, "memory": _memory_worker, "profile": _profile_worker}[kind](spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------
# Driver side: no torch import; spawns one fresh worker per measurement.
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    method: str
    steps: int
    batch: int
    seconds: float
    ratio: float
    best_seconds: float | None = None
    best_ratio: float | None = None
    cpu_seconds: float | None = None
    cpu_ratio: float | None = None
    peak_extra_mb: float | None = None
    memory_ratio: float | None = None
    lower_bound: bool = False
    kept_mb: float | None = None
    live_peak_mb: float | None = None
    live_memory_ratio: float | None = None
    cuda_peak_extra_mb: float | None = None
    cuda_memory_ratio: float | None = None
    times: list[float] = field(default_factory=list)
    train_times: list[float] = field(default_factory=list)


#: ``--allocator`` choices other than ``system``: the libraries to look for, in order.
ALLOCATOR_LIBRARIES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}


def allocator_library(name: str) -> str | None:
    """The shared library to ``LD_PRELOAD`` for ``--allocator name`` (``None`` if not installed)."""
    import ctypes.util

    for library in ALLOCATOR_LIBRARIES[name]:
        found = ctypes.util.find_library(library)
        if found:
            return found
    return None


def run_worker(
    spec: dict[str, Any], *, echo: bool = False, timeout: float | None = None, preload: str | None = None
) -> dict[str, Any]:
    """Run one worker in a fresh interpreter (with ``preload`` in ``LD_PRELOAD``); return its result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = None
    if preload:
        env = {**os.environ, "LD_PRELOAD": " ".join(filter(None, [preload, os.environ.get("LD_PRELOAD")]))}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    lines = proc.stdout.splitlines()
    if echo:
        print("\n".join(line for line in lines if not line.startswith(RESULT_PREFIX)))
    results = [line[len(RESULT_PREFIX) :] for line in lines if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not results:
        raise RuntimeError(
            f"worker {spec} failed with exit code {proc.returncode}:\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(results[-1])
    return result


def _csv_list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [kind(item) for item in text.split(",") if item.strip()]

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time and peak memory of ProsPr scoring relative to one plain training step.",
    )
    parser.add_argument(
        "--models",
        type=_csv_list(str),
        default=None,
        help=f"comma-separated subset of {', '.join(MODELS)} (default: {', '.join(DEFAULT_MODELS)}; "
        "resnet20-nobn is ResNet-20 with every BatchNorm replaced by Identity, to measure BN's cost)",
    )
    parser.add_argument(
        "--methods",
        type=_csv_list(str),
        default=None,
        help=f"comma-separated subset of {', '.join(METHODS)} (default: all but recompute)",
    )
    parser.add_argument("--steps", type=_csv_list(int), default=None, help="inner steps M (default 3)")
    parser.add_argument("--batch-sizes", type=_csv_list(int), default=None, help="default 128")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per op (default 3)")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="scaling preset: resnet20, full and first_order, M in 1,2,3,4,8, batch 32,64,128, "
        "1 repeat (the options above override each part)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke preset: resnet20, batch 8, M=1, 1 repeat, all methods"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory workers")
    parser.add_argument(
        "--memory-jobs",
        type=int,
        default=None,
        help="memory workers run at once, after the timing worker of the same configuration "
        "(default 1; 4 with --quick): their peaks add up on the machine",
    )
    parser.add_argument(
        "--no-live-memory",
        action="store_true",
        help="skip the live-tensor peak (a second, profiled call in each CPU memory worker)",
    )
    parser.add_argument(
        "--allocator",
        choices=("system", *ALLOCATOR_LIBRARIES),
        default="system",
        help="C allocator of the workers: system (default) or tcmalloc / jemalloc through LD_PRELOAD "
        "(must be installed, e.g. apt-get install libtcmalloc-minimal4 / libjemalloc2)",
    )
    parser.add_argument("--no-time", action="store_true", help="skip the timing workers")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the table, print torch.profiler's top ops for ResNet-20 full mode "
        "(first of --steps and --batch-sizes)",
    )
    parser.add_argument("--profile-rows", type=int, default=15, help="rows of each profile table (15)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("--csv", type=Path, help="also write the rows as CSV here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    preset: dict[str, Any] = {
        "models": list(DEFAULT_MODELS),
        "methods": list(DEFAULT_METHODS),
        "steps": [3],
        "batch_sizes": [128],
        "repeats": 3,
        "memory_jobs": 1,
    }
    if args.sweep:
        preset = {
            "models": ["resnet20"],
            "methods": ["full", "first_order"],
            "steps": [1, 2, 3, 4, 8],
            "batch_sizes": [32, 64, 128],
            "repeats": 1,
            "memory_jobs": 1,
        }
    if args.quick:
        preset = {
            "models": ["resnet20"],
            "methods": list(DEFAULT_METHODS),
            "steps": [1],
            "batch_sizes": [8],
            "repeats": 1,
            "memory_jobs": 4,
        }
    if args.profile:
        preset["models"] = ["resnet20"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in args.models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    for name in args.methods:
        if name not in METHODS:
            parser.error(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if (
        args.memory_jobs < 1
        or args.repeats < 1
        or any(s < 1 for s in args.steps)
        or any(b < 1 for b in args.batch_sizes)
    ):
        parser.error("--repeats, --memory-jobs, --steps and --batch-sizes must be positive")
    args.preload = None
    if args.allocator != "system" and args.worker is None:
        args.preload = allocator_library(args.allocator)
        if args.preload is None:
            parser.error(
                f"--allocator {args.allocator}: no lib{ALLOCATOR_LIBRARIES[args.allocator][0]} found; "
                "install it (Debian/Ubuntu: apt-get install libtcmalloc-minimal4 or libjemalloc2) "
                "or use --allocator system"
            )
    return args


def _ops(methods: Sequence[str], steps: Sequence[int]) -> list[tuple[str, int]]:
    ops: list[tuple[str, int]] = []
    for method in methods:
        if method == "snip":
            ops.append(("snip", 0))
        else:
            ops += [(method, m) for m in steps]
    return ops


def _fmt(value: float | None, digits: int = 2, bound: bool = False) -> str:
    if value is None or math.isnan(value):  # not measured (e.g. seconds with --no-time)
        return "-"
    return f"{'<=' if bound else ''}{value:.{digits}f}"


def markdown_table(rows: Sequence[Row], cuda: bool) -> str:
    header = ["model", "method", "M", "batch", "seconds", "ratio to train step", "peak extra MB"]
    header += ["memory ratio to train step", "best s", "best ratio", "CPU s", "CPU ratio"]
    header += ["kept MB", "live peak MB", "live memory ratio"]
    if cuda:
        header += ["CUDA peak extra MB", "CUDA memory ratio"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [
            r.model,
            r.method,
            str(r.steps),
            str(r.batch),
            _fmt(r.seconds, 3),
            _fmt(r.ratio),
            _fmt(r.peak_extra_mb, 0, r.lower_bound),
            _fmt(r.memory_ratio),
            _fmt(r.best_seconds, 3),
            _fmt(r.best_ratio),
            _fmt(r.cpu_seconds, 3),
            _fmt(r.cpu_ratio),
            _fmt(r.kept_mb, 0),
            _fmt(r.live_peak_mb, 0),
            _fmt(r.live_memory_ratio),
        ]
        if cuda:
            cells += [_fmt(r.cuda_peak_extra_mb, 0), _fmt(r.cuda_memory_ratio)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cpu_description() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return f"{name}; os.cpu_count()={os.cpu_count()}, usable={usable}"


def _engine_version() -> str:
    """The checkout's commit, and whether the engine files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "lightning_prospr/scores.py", "lightning_prospr/unroll.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" with uncommitted changes to scores.py / unroll.py" if dirty else "")


def header(env: dict[str, Any], command: str, repeats: int, engine: str) -> str:
    device = env.get("device", "?")
    if "device_name" in env:
        device += f" ({env['device_name']})"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return "\n".join(
        [
            f"- command: `{command}`",
            f"- torch {env.get('torch', '?')}, Python {env.get('python', '?')}, device {device}, "
            f"torch threads {env.get('threads', '?')}",
            f"- CPU: {_cpu_description()}; C allocator of the workers: {env.get('allocator', '?')}",
            f"- engine: commit {engine} (at the start)",
            f"- load average at the end (1, 5, 15 min): {load}",
            f"- time: 1 warm-up, median of {repeats} timed calls, each paired with a train step timed "
            "in the same process; memory: peak RSS above the pre-op RSS, one fresh process per op "
            "(kept: the RSS above it after the op); live: peak of live tensor bytes (torch.profiler) "
            "in a second call",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return 0
    command = shlex.join(["python", "benchmarks/speed.py", *argv])
    base = {"device": args.device, "threads": args.threads, "live": not args.no_live_memory}

    if args.profile:
        spec = {
            **base,
            "kind": "profile",
            "model": "resnet20",
            "batch": args.batch_sizes[0],
            "op": ("full", args.steps[0]),
            "rows": args.profile_rows,
        }
        print(f"# ProsPr scoring profile\n\n- command: `{command}`\n- CPU: {_cpu_description()}")
        result = run_worker(spec, echo=True, preload=args.preload)
        print(f"- torch {result['env']['torch']}, device {result['env']['device']}")
        return 0

    engine = _engine_version()
    ops = _ops(args.methods, args.steps)
    rows: list[Row] = []
    env: dict[str, Any] = {}
    started = time.perf_counter()
    for model_name in args.models:
        for batch in args.batch_sizes:
            cfg = {**base, "model": model_name, "batch": batch}
            train_row = Row(model_name, TRAIN, 0, batch, float("nan"), 1.0)
            op_rows = [Row(model_name, m, s, batch, float("nan"), float("nan")) for m, s in ops]
            if not args.no_time:
                print(f"[timing] {model_name} batch {batch}: {ops}", file=sys.stderr, flush=True)
                timing = run_worker(
                    {**cfg, "kind": "time", "ops": ops, "repeats": args.repeats}, preload=args.preload
                )
                env = timing["env"]
                train_row.seconds = timing["train_seconds"]
                train_row.best_seconds, train_row.best_ratio = timing["train_best"], 1.0
                train_row.cpu_seconds, train_row.cpu_ratio = timing["train_cpu_seconds"], 1.0
                for row, res in zip(op_rows, timing["ops"], strict=True):
                    row.seconds, row.times = res["seconds"], res["times"]
                    row.train_times = res["train_times"]
                    row.ratio = res["seconds"] / res["train_seconds"]
                    row.best_seconds = min(res["times"])
                    row.best_ratio = row.best_seconds / timing["train_best"]
                    row.cpu_seconds = res["cpu_seconds"]
                    row.cpu_ratio = res["cpu_seconds"] / res["train_cpu_seconds"]
                    train_row.times += res["train_times"]
            if not args.no_memory:
                print(f"[memory] {model_name} batch {batch}: {len(ops) + 1} workers", file=sys.stderr)
                specs = [{**cfg, "kind": "memory", "op": (r.method, r.steps)} for r in [train_row, *op_rows]]
                # Each worker measures its own process, so running several at once changes nothing
                # but the total memory in use on the machine (and the wall time of the benchmark).
                with ThreadPoolExecutor(max_workers=args.memory_jobs) as pool:
                    measured = list(pool.map(lambda spec: run_worker(spec, preload=args.preload), specs))
                for row, mem in zip([train_row, *op_rows], measured, strict=True):
                    env = env or mem["env"]
                    row.peak_extra_mb, row.lower_bound = mem["peak_extra_mb"], mem["lower_bound"]
                    row.cuda_peak_extra_mb = mem.get("cuda_peak_extra_mb")
                    row.kept_mb, row.live_peak_mb = mem.get("kept_mb"), mem.get("live_peak_mb")
                for row in [train_row, *op_rows]:
                    if row.peak_extra_mb is not None and train_row.peak_extra_mb:
                        row.memory_ratio = row.peak_extra_mb / train_row.peak_extra_mb
                    if row.live_peak_mb is not None and train_row.live_peak_mb:
                        row.live_memory_ratio = row.live_peak_mb / train_row.live_peak_mb
                    if row.cuda_peak_extra_mb is not None and train_row.cuda_peak_extra_mb:
                        row.cuda_memory_ratio = row.cuda_peak_extra_mb / train_row.cuda_peak_extra_mb
            rows += [train_row, *op_rows]
    cuda = str(env.get("device", "")).startswith("cuda")
    elapsed = time.perf_counter() - started
    report = "\n".join(
        [
            "# ProsPr scoring cost relative to one training step",
            "",
            header(env, command, args.repeats, engine),
            f"- wall time of this benchmark: {elapsed:.0f} s",
            "",
            markdown_table(rows, cuda=cuda),
            "",
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report)
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])) if rows else [])
            writer.writeheader()
            for row in rows:
                record = asdict(row)
                record["times"] = " ".join(f"{t:.4f}" for t in row.times)
                record["train_times"] = " ".join(f"{t:.4f}" for t in row.train_times)
                writer.writerow(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
