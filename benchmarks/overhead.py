"""OptimizeLoss's cost per training step, side by side with Lightning's own clipping, in one process.

Run from the repository root::

    python -m benchmarks.overhead [--rounds 5] [--device cpu|cuda] [--output benchmarks/results]

Every configuration trains the same model in a real ``Trainer`` (SGD, an MLflow logger on a local sqlite store,
``log_every_n_steps=50``), in interleaved rounds (each round runs every configuration once, in a shuffled
order), and the reported value is the median over rounds of each fit's median; ratios to Lightning's clipping are
taken per round (paired, so that a shared machine's drifts cancel), then their median and range are reported. Two
times are taken per step:

- **step**: from one ``on_train_batch_start`` to the next: the whole loop iteration (data, forward, backward,
  hooks, update, logging).
- **processing**: from the first callback's ``on_before_optimizer_step`` to the end of the module's
  ``configure_gradient_clipping``: OptimizeLoss's pipeline, or Lightning's clipping, and nothing else.

Configurations: ``bare`` (no clipping), ``lightning_clip`` (``Trainer(gradient_clip_val=1e-3)``), ``clip``
(``OptimizeLoss(clip_gradients=1e-3, summaries=[])``), ``full`` (multipliers on half the tensors, clipping and
the default summaries to MLflow every 50 steps), ``full_noise`` (the same with ``gradient_noise_scale=0.01``),
``full_spikes`` (``full`` with ``skip_spikes=spike_skipping_fn(warmup_steps=10)``: one device read per step),
``all_summaries`` (clipping and all five summaries every step) and ``all_summaries_same_priority`` (the same with
the logger's delivery thread at the training thread's priority, ``MLFlowLogger(delivery_niceness=0)``). Models:
``small`` (100 linear layers of 32x32, 200 tensors: per-tensor overhead) and ``large`` (3 linear layers of
4096x4096, 50M parameters: bandwidth).

Beside them: ``randn`` (one ``torch.randn`` of as many numbers as the model has parameters, the floor of any
noise), the peak memory of a step and of its processing above what was resident when it began (see
:class:`MemoryProbe`) against the largest parameter, and the scaling of the processing
time with the number of parameters (1M / 10M / 100M in 10 tensors) and of tensors (10M parameters in 10 / 100 /
1000 tensors). The results go to ``OUTPUT/overhead.json`` and ``OUTPUT/overhead.png``; the tables are
printed as Markdown (``benchmarks/BENCHMARKS.md`` holds the last ones).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_optloss import OPTIMIZER_SUMMARIES, MLFlowLogger, OptimizeLoss, configure_optimizers, spike_skipping_fn

LOG_EVERY = 50
CLIP = 1e-3  # below every model's gradient norm: both sides scale the gradients on every step


class Clock:
    """Wall time that waits for the device first (CUDA kernels run asynchronously)."""

    def __init__(self, device: str) -> None:
        self.synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def __call__(self) -> float:
        self.synchronize()
        return time.perf_counter()


class RepeatedBatch(Dataset):
    """The same batch ``length`` times: no data cost to speak of."""

    def __init__(self, batch: tuple[Tensor, Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.batch


class BenchmarkModule(pl.LightningModule):
    """Plain SGD; marks the end of the gradient processing for :class:`Timer`."""

    timer: Timer | None = None

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self, torch.optim.SGD, 1e-3)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, **kwargs: Any) -> None:
        super().configure_gradient_clipping(optimizer, gradient_clip_val, **kwargs)
        if self.timer is not None:
            self.timer.processing_end()


class LinearStack(BenchmarkModule):
    """``layers`` linear layers of ``width`` (2 tensors each), mean squared error."""

    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return torch.mean((self.body(x) - y) ** 2)


class ParameterBank(BenchmarkModule):
    """``tensors`` parameters of ``size`` elements and a loss linear in them: the gradients cost one multiply."""

    def __init__(self, tensors: int, size: int) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(size) * 0.01) for _ in range(tensors))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        scale = batch[0].mean()
        return sum((weight * scale).sum() for weight in self.weights)


class Timer(pl.Callback):
    """Step and processing times of one fit (the first ``warmup`` steps left out)."""

    def __init__(self, clock: Clock, warmup: int) -> None:
        self.clock, self.warmup = clock, warmup
        self.starts: list[float] = []
        self.processing: list[float] = []
        self._processing_start = 0.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.timer = self

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, index: int) -> None:
        self.starts.append(self.clock())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._processing_start = self.clock()

    def processing_end(self) -> None:
        self.processing.append(self.clock() - self._processing_start)

    def medians(self) -> tuple[float, float]:
        steps = [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)][self.warmup :]
        return statistics.median(steps), statistics.median(self.processing[self.warmup :])


@dataclass
class Configuration:
    """One way of training: the Trainer's clipping, and an OptimizeLoss to add (or none)."""

    name: str
    callback: Callable[[nn.Module], OptimizeLoss | None]
    trainer: dict[str, Any] = field(default_factory=dict)
    steps_fraction: float = 1.0  # of the model's steps (all_summaries: its logging takes long to deliver)
    logger: dict[str, Any] = field(default_factory=dict)  # MLFlowLogger options


def _half_the_tensors(module: nn.Module) -> dict[str, float]:
    return {name: 0.5 for index, (name, _) in enumerate(module.named_parameters()) if index % 2 == 0}


CONFIGURATIONS = [
    Configuration("bare", lambda module: None),
    Configuration("lightning_clip", lambda module: None, {"gradient_clip_val": CLIP}),
    Configuration("clip", lambda module: OptimizeLoss(clip_gradients=CLIP, summaries=[], seed=0)),
    Configuration(
        "full", lambda module: OptimizeLoss(gradient_multipliers=_half_the_tensors(module), clip_gradients=CLIP, seed=0)
    ),
    Configuration(
        "full_noise",
        lambda module: OptimizeLoss(
            gradient_noise_scale=0.01, gradient_multipliers=_half_the_tensors(module), clip_gradients=CLIP, seed=0
        ),
    ),
    Configuration(
        "full_spikes",
        lambda module: OptimizeLoss(
            gradient_multipliers=_half_the_tensors(module),
            clip_gradients=CLIP,
            seed=0,
            skip_spikes=spike_skipping_fn(warmup_steps=10),
        ),
    ),
    Configuration(
        "all_summaries",
        lambda module: OptimizeLoss(clip_gradients=CLIP, summaries=OPTIMIZER_SUMMARIES, seed=0),
        {"log_every_n_steps": 1},
        steps_fraction=0.4,
    ),
    Configuration(
        "all_summaries_same_priority",
        lambda module: OptimizeLoss(clip_gradients=CLIP, summaries=OPTIMIZER_SUMMARIES, seed=0),
        {"log_every_n_steps": 1},
        steps_fraction=0.4,
        logger={"delivery_niceness": 0},
    ),
]


@dataclass
class Model:
    name: str
    make: Callable[[], BenchmarkModule]
    batch: Callable[[], tuple[Tensor, Tensor]]
    steps: int


MODELS = {
    "small": Model("small", lambda: LinearStack(100, 32), lambda: (torch.randn(16, 32), torch.randn(16, 32)), 300),
    "large": Model("large", lambda: LinearStack(3, 4096), lambda: (torch.randn(8, 4096), torch.randn(8, 4096)), 25),
}


def fit(
    model: BenchmarkModule, batch: tuple[Tensor, Tensor], steps: int, configuration: Configuration, args: Any
) -> tuple[float, float]:
    """One timed fit: the medians of its step and processing times, in seconds."""
    timer = Timer(Clock(args.device), warmup=min(10, steps // 5))
    callback = configuration.callback(model)
    # all_summaries logs faster than sqlite stores: the end of fit (not timed) waits until all is delivered, so
    # that no delivery thread runs into the next configuration's timing.
    logger = MLFlowLogger(
        experiment_name=f"overhead-{uuid.uuid4().hex[:8]}",
        tracking_uri=args.tracking_uri,
        flush_timeout=3600.0,
        spill_dir=args.store,
        **configuration.logger,
    )
    options: dict[str, Any] = {
        "accelerator": args.device,
        "devices": 1,
        "max_steps": steps,
        "logger": logger,
        "log_every_n_steps": LOG_EVERY,
        "callbacks": [timer] + ([callback] if callback is not None else []),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    options.update(configuration.trainer)
    loader = DataLoader(RepeatedBatch(batch, steps), batch_size=None)
    pl.Trainer(**options).fit(model, loader)
    return timer.medians()


def timed_randn(count: int, device: str, repeats: int = 15) -> float:
    """Median seconds of one ``torch.randn(count)``."""
    clock = Clock(device)
    times = []
    for _ in range(repeats):
        start = clock()
        torch.randn(count, device=device)
        times.append(clock() - start)
    return statistics.median(times)


def compare(args: Any) -> dict[str, Any]:
    """Interleaved rounds of every configuration on every model."""
    results: dict[str, Any] = {}
    for model_spec in (MODELS[name] for name in args.models):
        torch.manual_seed(0)
        model = model_spec.make().to(args.device)
        batch = tuple(tensor.to(args.device) for tensor in model_spec.batch())
        parameters = sum(p.numel() for p in model.parameters())
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        per_round: dict[str, list[tuple[float, float]]] = {c.name: [] for c in CONFIGURATIONS}
        for round_index in range(args.rounds):
            order = list(CONFIGURATIONS)
            random.Random(round_index).shuffle(order)
            for configuration in order:
                model.load_state_dict(initial)
                steps = max(10, round(model_spec.steps * configuration.steps_fraction))
                per_round[configuration.name].append(fit(model, batch, steps, configuration, args))
            print(f"  {model_spec.name}: round {round_index + 1}/{args.rounds} done", flush=True)
        results[model_spec.name] = {
            "parameters": parameters,
            "tensors": len(list(model.parameters())),
            "randn_s": timed_randn(parameters, args.device),
            "configurations": {
                name: {
                    "step_s": statistics.median(step for step, _ in rounds),
                    "processing_s": statistics.median(processing for _, processing in rounds),
                    # Paired with Lightning's clipping in the same round: drifts of a shared machine cancel.
                    "step_ratio": _paired_ratios(rounds, per_round["lightning_clip"], 0),
                    "processing_ratio": _paired_ratios(rounds, per_round["lightning_clip"], 1),
                    "rounds": rounds,
                }
                for name, rounds in per_round.items()
            },
        }
    return results


def _paired_ratios(rounds: list[tuple[float, float]], reference: list[tuple[float, float]], field: int) -> list[float]:
    """Median, lowest and highest of the per-round ratios ``rounds[r][field] / reference[r][field]``."""
    ratios = [ours[field] / theirs[field] for ours, theirs in zip(rounds, reference, strict=True)]
    return [statistics.median(ratios), min(ratios), max(ratios)]


class MemoryProbe(pl.Callback):
    """The peak resident memory of each step, and of its processing, above what was resident when it began.

    On CUDA: ``torch.cuda.max_memory_allocated``. On a CPU: Linux's ``VmHWM`` (the resident set's high-water
    mark, reset through ``/proc/self/clear_refs``) in a process whose glibc maps every allocation of 64 KiB and
    more and unmaps it when freed (:func:`memory` starts one), so the resident set follows live memory across
    every thread (the noise is drawn on worker threads).
    """

    def __init__(self, device: str, first_step: int) -> None:
        self.device, self.first_step = device, first_step
        self.step_peaks: list[int] = []
        self.processing_peaks: list[int] = []
        self._step_base = self._processing_base = 0
        self._index = 0

    def _reset(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        Path("/proc/self/clear_refs").write_text("5")
        return _status_bytes("VmRSS")

    def _peak(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status_bytes("VmHWM")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.timer = self  # BenchmarkModule calls processing_end()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, index: int) -> None:
        self._index = index
        self._step_base = self._reset()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._step_peak = self._peak()
        self._processing_base = self._reset()

    def processing_end(self) -> None:
        if self._index >= self.first_step:
            self.processing_peaks.append(self._peak() - self._processing_base)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._index >= self.first_step:
            peak = max(self._step_peak - self._step_base, self._peak() - self._processing_base)
            self.step_peaks.append(peak)


def _status_bytes(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def probe_memory(args: Any) -> dict[str, Any]:
    """Peak memory of every configuration on every model (in this process: see :func:`memory`)."""
    results = {}
    for model_spec in (MODELS[name] for name in args.models):
        torch.manual_seed(0)
        model = model_spec.make().to(args.device)
        batch = tuple(tensor.to(args.device) for tensor in model_spec.batch())
        rows = {}
        for configuration in CONFIGURATIONS:
            probe = MemoryProbe(args.device, first_step=2)
            callback = configuration.callback(model)
            options: dict[str, Any] = {
                "accelerator": args.device,
                "devices": 1,
                "max_steps": 5,
                "logger": False,
                "callbacks": [probe] + ([callback] if callback is not None else []),
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "enable_checkpointing": False,
            }
            options.update({k: v for k, v in configuration.trainer.items() if k != "log_every_n_steps"})
            pl.Trainer(**options).fit(model, DataLoader(RepeatedBatch(batch, 5), batch_size=None))
            rows[configuration.name] = {"step": max(probe.step_peaks), "processing": max(probe.processing_peaks)}
        largest = max(p.numel() * p.element_size() for p in model.parameters())
        results[model_spec.name] = {"largest_parameter_bytes": largest, "peak_bytes": rows}
    return results


def memory(args: Any) -> dict[str, Any]:
    """:func:`probe_memory` in a new process (on a CPU, with glibc's mmap threshold at 64 KiB)."""
    if args.device == "cuda":
        return probe_memory(args)
    command = [sys.executable, "-m", "benchmarks.overhead", "--probe-memory", "--models", *args.models]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# 10 tensors of 1M / 10M / 100M parameters in all; 10M parameters in 10 / 100 / 1000 tensors.
SCALING = [("parameters", 10, size) for size in (100_000, 1_000_000, 10_000_000)] + [
    ("tensors", tensors, 10_000_000 // tensors) for tensors in (10, 100, 1000)
]


def scaling(args: Any) -> list[dict[str, Any]]:
    """Processing time of ``full_noise`` and of ``lightning_clip`` against the size and the number of tensors."""
    configurations = [c for c in CONFIGURATIONS if c.name in ("lightning_clip", "clip", "full", "full_noise")]
    rows = []
    for axis, tensors, size in SCALING:
        model = ParameterBank(tensors, size).to(args.device)
        batch = (torch.ones(1, device=args.device), torch.ones(1, device=args.device))
        row: dict[str, Any] = {"axis": axis, "tensors": tensors, "parameters": tensors * size}
        steps = 30 if tensors * size < 50_000_000 else 12
        for configuration in configurations:
            times = [fit(model, batch, steps, configuration, args)[1] for _ in range(args.scaling_rounds)]
            row[configuration.name] = statistics.median(times)
        row["randn_s"] = timed_randn(tensors * size, args.device)
        print(f"  scaling: {tensors} x {size} done", flush=True)
        rows.append(row)
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for model_name, model in results["compare"].items():
        configurations = model["configurations"]
        bare, lightning = configurations["bare"], configurations["lightning_clip"]
        lines.append(
            f"\n**{model_name}**: {model['parameters']:,} parameters in {model['tensors']} tensors; "
            f"`torch.randn({model['parameters']:,})` takes {model['randn_s'] * 1e3:.2f} ms\n"
        )
        lines.append(
            "| configuration | step ms | step / Lightning's clipping, per round: median (range) | processing ms "
            "| processing / Lightning's clipping |"
        )
        lines.append("|---|---|---|---|---|")
        for name, values in configurations.items():
            step, processing = values["step_ratio"], values["processing_ratio"]
            lines.append(
                f"| {name} | {values['step_s'] * 1e3:.3f} | {step[0]:.3f} ({step[1]:.2f}-{step[2]:.2f}) | "
                f"{values['processing_s'] * 1e3:.3f} | {processing[0]:.3f} ({processing[1]:.2f}-{processing[2]:.2f}) |"
            )
        noise = configurations["full_noise"]["processing_s"] - configurations["full"]["processing_s"]
        lines.append(
            f"\nNoise: {noise * 1e3:.2f} ms of processing = {noise / model['randn_s']:.2f} x one `torch.randn`; "
            f"Lightning's clipping costs {(lightning['step_s'] - bare['step_s']) * 1e3:.3f} ms a step over bare."
        )
    if "memory" in results:
        lines.append("\nPeak memory above the step's start, MB: step (processing)\n")
        lines.append("| model | largest parameter MB | " + " | ".join(c.name for c in CONFIGURATIONS) + " |")
        lines.append("|---|---|" + "---|" * len(CONFIGURATIONS))
        for model_name, model in results["memory"].items():
            cells = [model["peak_bytes"][c.name] for c in CONFIGURATIONS]
            peaks = " | ".join(f"{cell['step'] / 1e6:.2f} ({cell['processing'] / 1e6:.2f})" for cell in cells)
            lines.append(f"| {model_name} | {model['largest_parameter_bytes'] / 1e6:.2f} | {peaks} |")
    if "scaling" in results:
        lines.append("\n| tensors | parameters | Lightning clip ms | clip ms | full ms | full_noise ms | randn ms |")
        lines.append("|---|---|---|---|---|---|---|")
        for row in results["scaling"]:
            cells = [f"{row[name] * 1e3:.2f}" for name in ("lightning_clip", "clip", "full", "full_noise", "randn_s")]
            lines.append(f"| {row['tensors']} | {row['parameters']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Step-time ratios per model, and processing time against parameters and against tensors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["compare"])
    scaling_axes = ["parameters", "tensors"] if "scaling" in results else []
    columns = len(models) + len(scaling_axes)
    figure, axes = plt.subplots(1, columns, figsize=(4.5 * columns, 4), squeeze=False)
    axes = list(axes[0])
    for axis, model_name in zip(axes, models, strict=False):
        configurations = results["compare"][model_name]["configurations"]
        names = list(configurations)
        axis.barh(names, [configurations[name]["step_ratio"][0] for name in names], color="tab:blue")
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_xlabel("step time / Lightning's clipping")
        axis.set_title(f"{model_name} model")
        axis.invert_yaxis()
    for axis, axis_name in zip(axes[len(models) :], scaling_axes, strict=True):
        rows = [row for row in results["scaling"] if row["axis"] == axis_name]
        x = [row[axis_name] for row in rows]
        for name in ("lightning_clip", "clip", "full", "full_noise", "randn_s"):
            axis.loglog(x, [row[name] * 1e3 for row in rows], marker="o", label=name)
        axis.set_xlabel(axis_name + (" (10 tensors)" if axis_name == "parameters" else " (10M parameters)"))
        axis.set_ylabel("processing ms per step")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    return (
        f"{platform.platform()}, {device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"lightning {pl.__version__}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scaling-rounds", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--skip", nargs="*", choices=["memory", "scaling"], default=[])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--probe-memory", action="store_true", help=argparse.SUPPRESS)  # memory()'s subprocess
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.probe_memory:
        print(json.dumps(probe_memory(args)))
        return
    store = Path(tempfile.mkdtemp(prefix="overhead-benchmark-"))
    args.store = store
    args.tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
    results: dict[str, Any] = {"machine": machine(), "compare": compare(args)}
    if "memory" not in args.skip:
        results["memory"] = memory(args)
    if "scaling" not in args.skip:
        results["scaling"] = scaling(args)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "overhead.json").write_text(json.dumps(results, indent=1))
    plot(results, args.output / "overhead.png")
    print(f"\n{results['machine']}\n{markdown(results)}")


if __name__ == "__main__":
    main()
