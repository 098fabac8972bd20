"""Generate the TensorFlow reference fixtures that the PyTorch tests compare against.

This script is run BY HAND, never by CI: it needs the real TensorFlow and tf-slim, which are not
dependencies of this project.  The fixtures it writes are committed, and the tests only read them:

* ``tests/tf/reference/fixtures/optimize_loss.json``: training runs of
  ``tf_slim.layers.optimizers.optimize_loss`` (the maintained copy of TF1's
  ``tf.contrib.layers.optimize_loss``) on a tiny two-layer model, with every scalar and histogram
  summary TF emitted and the parameters after every update;
* ``tests/tf/reference/fixtures/decay.json``: the ``tf.compat.v1.train.*`` learning-rate schedules
  evaluated at global steps 0..30.

How to run it (from the repository root)::

    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu tf-slim
    /tmp/tfenv/bin/python tests/tf/reference/make_tf_reference.py

The output is deterministic (fixed numpy seeds, no random TF ops, single-threaded session, oneDNN
off), so running it again rewrites byte-identical files unless the TensorFlow version changes.

Details of the reference model:

* float32 everywhere; ``loss = mean((tanh(x @ w1 + b1) @ w2 + b2 - y)**2)``;
* the variables are RESOURCE variables, created with
  ``tf.compat.v1.get_variable(name, initializer=<numpy array>, use_resource=True)`` and named
  ``w1``, ``b1``, ``w2``, ``b2`` (TF names ``w1:0`` ...);
* one batch per step (placeholders ``x`` (8, 4) and ``y`` (8, 3)); each step runs the train op and
  the merged summary op in ONE ``Session.run``, so the adaptive-clipping moving averages are updated
  once per step and the summaries describe this step's gradients; the parameters are read after it.

Newer TensorFlow removed two aliases that tf-slim still uses (``ops.Tensor`` and
``ops.IndexedSlices``); they are restored below before ``tf_slim.layers.optimizers`` is imported.
"""

from __future__ import annotations

import os

# Plain (non-oneDNN) CPU kernels and quiet logs; must be set before TensorFlow is imported.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.metadata
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops

if not hasattr(tf_ops, "Tensor"):
    tf_ops.Tensor = tf.Tensor
if not hasattr(tf_ops, "IndexedSlices"):
    tf_ops.IndexedSlices = tf.IndexedSlices

from tf_slim.layers import optimizers as slim_optimizers

tf.compat.v1.disable_v2_behavior()

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SCRIPT = "tests/tf/reference/make_tf_reference.py"

PARAM_SEED = 20240611
DATA_SEED = 7
BATCH_SIZE = 8
N_IN, N_HIDDEN, N_OUT = 4, 8, 3
MAX_STEPS = 15
TARGET_SCALE = 5.0
# Steps whose targets are scaled up further, so the gradient norm spikes and adaptive clipping fires
# after its moving averages have settled (not only in the first steps).
SPIKE_STEPS = {6: 3.0, 11: 3.0}
PARAM_NAMES = ("w1", "b1", "w2", "b2")

ALL_SUMMARIES = ["learning_rate", "loss", "gradients", "gradient_norm", "global_gradient_norm"]
ADAPTIVE_DEFAULTS = {
    "std_factor": 2.0,
    "decay": 0.95,
    "static_max_norm": None,
    "global_step": False,
    "report_summary": False,
    "epsilon": 1e-08,
}
# A step whose global norm is this close (relatively) to its clipping threshold is reported as
# borderline: float rounding could decide whether it clips, so a test on it would be fragile.
BORDERLINE_RTOL = 1e-5


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def f32(value: Any) -> float:
    """A scalar as the exact Python float of its float32 value."""
    return float(np.float32(value))


def f32_list(array: Any) -> list:
    """A (nested) list of exact Python floats of the array's float32 values."""
    return np.asarray(array, dtype=np.float32).tolist()


def make_initial_params() -> dict[str, np.ndarray]:
    """The initial parameters shared by every case (normal * 0.5, fixed seed)."""
    rng = np.random.default_rng(PARAM_SEED)
    shapes = {"w1": (N_IN, N_HIDDEN), "b1": (N_HIDDEN,), "w2": (N_HIDDEN, N_OUT), "b2": (N_OUT,)}
    return {name: (rng.standard_normal(shape) * 0.5).astype(np.float32) for name, shape in shapes.items()}


def make_batches(n_steps: int) -> list[dict[str, np.ndarray]]:
    """One (x, y) batch per step; y is a scaled nonlinear function of x, so gradients are large."""
    rng = np.random.default_rng(DATA_SEED)
    mix = rng.standard_normal((N_IN, N_OUT))
    offset = np.array([1.0, -0.5, 0.25])
    batches = []
    for step in range(n_steps):
        x = rng.standard_normal((BATCH_SIZE, N_IN))
        y = TARGET_SCALE * SPIKE_STEPS.get(step, 1.0) * np.sin(x @ mix + offset)
        batches.append({"x": x.astype(np.float32), "y": y.astype(np.float32)})
    return batches


# --------------------------------------------------------------------------------------------
# Case definitions
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One optimize_loss training run, in the fixture's vocabulary (torch parameter names)."""

    description: str
    optimizer: str
    learning_rate: float
    steps: int
    clip_gradients: float | dict | None = None
    learning_rate_decay: dict | None = None
    gradient_multipliers: dict[str, float] | None = None
    variables: list[str] | None = None
    summaries: list[str] | None = field(default_factory=lambda: list(ALL_SUMMARIES))
    increment_global_step: bool = True


def adaptive(**kwargs: Any) -> dict:
    """The fixture record of an ``adaptive_clipping_fn(**kwargs)`` call, defaults filled in."""
    unknown = set(kwargs) - set(ADAPTIVE_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown adaptive_clipping_fn arguments: {sorted(unknown)}")
    return {"adaptive": {**ADAPTIVE_DEFAULTS, **kwargs}}


EXP_DECAY = {"fn": "exponential_decay", "kwargs": {"decay_steps": 3, "decay_rate": 0.5, "staircase": False}}


def make_cases() -> dict[str, Case]:
    """All training cases, in fixture order."""
    cases = {
        f"opt_{name.lower()}": Case(f"{name}, no clipping", name, lr, 12)
        for name, lr in [
            ("SGD", 0.05),
            ("Momentum", 0.05),
            ("Adagrad", 0.1),
            ("Adam", 0.01),
            ("RMSProp", 0.01),
            ("Ftrl", 0.1),
        ]
    }
    cases["clip_float"] = Case("Adam with clip_gradients=1.0 (clip_by_global_norm)", "Adam", 0.01, 12, 1.0)
    cases["adaptive_fixed_decay"] = Case(
        "Momentum with adaptive_clipping_fn(report_summary=True), fixed decay 0.95",
        "Momentum",
        0.05,
        15,
        adaptive(report_summary=True),
    )
    cases["adaptive_step_aware"] = Case(
        "SGD with adaptive_clipping_fn(std_factor=1.0, global_step=global_step): decay min(0.95, n/(n+1))",
        "SGD",
        0.05,
        15,
        adaptive(std_factor=1.0, global_step=True, report_summary=True),
    )
    cases["adaptive_static_max_norm"] = Case(
        "SGD with adaptive_clipping_fn(static_max_norm=0.5, decay=0.9, global_step=global_step)",
        "SGD",
        0.05,
        15,
        adaptive(static_max_norm=0.5, decay=0.9, global_step=True, report_summary=True),
    )
    cases["multipliers"] = Case(
        "SGD, gradient_multipliers {w1: 0.5, b2: 3.0} (applied before clipping), clip_gradients=2.0",
        "SGD",
        0.05,
        12,
        2.0,
        gradient_multipliers={"w1": 0.5, "b2": 3.0},
    )
    cases["decay_exponential"] = Case(
        "Adam, exponential_decay(lr, global_step, decay_steps=3, decay_rate=0.5)",
        "Adam",
        0.05,
        12,
        learning_rate_decay=EXP_DECAY,
    )
    cases["decay_no_increment"] = Case(
        "as decay_exponential but increment_global_step=False: the global step and the LR stay put",
        "Adam",
        0.05,
        12,
        learning_rate_decay=EXP_DECAY,
        increment_global_step=False,
    )
    cases["variables_subset"] = Case(
        "SGD, variables=[w2, b2]: only these are optimized and summarized",
        "SGD",
        0.05,
        10,
        variables=["w2", "b2"],
    )
    cases["default_summaries"] = Case(
        "Adagrad, summaries=None (TF default: loss, learning_rate, global_gradient_norm)",
        "Adagrad",
        0.1,
        10,
        summaries=None,
    )
    return cases


# --------------------------------------------------------------------------------------------
# Running one case in TensorFlow
# --------------------------------------------------------------------------------------------


def session_config() -> tf.compat.v1.ConfigProto:
    """Single-threaded CPU session, for reproducible reductions."""
    return tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=1, inter_op_parallelism_threads=1, device_count={"GPU": 0}
    )


def build_clip(clip: float | dict | None, global_step: tf.Variable) -> Any:
    """The ``clip_gradients`` argument for optimize_loss from its fixture record."""
    if clip is None or isinstance(clip, float):
        return clip
    kwargs = dict(clip["adaptive"])
    kwargs["global_step"] = global_step if kwargs["global_step"] else None
    return slim_optimizers.adaptive_clipping_fn(**kwargs)


def build_decay(decay: dict | None) -> Any:
    """The ``learning_rate_decay_fn`` argument for optimize_loss from its fixture record."""
    if decay is None:
        return None
    schedule = getattr(tf.compat.v1.train, decay["fn"])
    return lambda lr, gs: schedule(lr, gs, **decay["kwargs"])


def build_optimize_loss(case: Any, loss: tf.Tensor, global_step: tf.Variable, **keywords: Any) -> tf.Operation:
    """tf_slim's ``optimize_loss`` with the case's learning rate, optimizer, multipliers, clipping, decay and
    summaries; ``keywords`` are its further arguments."""
    multipliers = case.gradient_multipliers
    return slim_optimizers.optimize_loss(
        loss,
        global_step,
        case.learning_rate,
        case.optimizer,
        gradient_multipliers=None if multipliers is None else {f"{k}:0": v for k, v in multipliers.items()},
        clip_gradients=build_clip(case.clip_gradients, global_step),
        learning_rate_decay_fn=build_decay(case.learning_rate_decay),
        summaries=case.summaries,
        **keywords,
    )


def build_graph(case: Case, initial: dict[str, np.ndarray]) -> dict[str, Any]:
    """Build the model and optimize_loss in the current default graph; return the handles."""
    x = tf.compat.v1.placeholder(tf.float32, (BATCH_SIZE, N_IN), name="x")
    y = tf.compat.v1.placeholder(tf.float32, (BATCH_SIZE, N_OUT), name="y")
    params = {
        name: tf.compat.v1.get_variable(name, initializer=initial[name], use_resource=True) for name in PARAM_NAMES
    }
    hidden = tf.tanh(tf.matmul(x, params["w1"]) + params["b1"])
    loss = tf.reduce_mean(tf.square(tf.matmul(hidden, params["w2"]) + params["b2"] - y))
    global_step = tf.compat.v1.train.get_or_create_global_step()
    train_op = build_optimize_loss(
        case,
        loss,
        global_step,
        variables=None if case.variables is None else [params[name] for name in case.variables],
        increment_global_step=case.increment_global_step,
    )
    summary_op = tf.compat.v1.summary.merge_all()
    return {
        "x": x,
        "y": y,
        "params": params,
        "global_step": global_step,
        "train": train_op,
        "summary": summary_op,
    }


def parse_summary(serialized: bytes) -> tuple[dict[str, float], dict[str, dict]]:
    """Split a serialized ``Summary`` proto into scalar values and histogram statistics (tags verbatim)."""
    scalars: dict[str, float] = {}
    histograms: dict[str, dict] = {}
    for value in tf.compat.v1.Summary.FromString(serialized).value:
        if value.HasField("simple_value"):
            scalars[value.tag] = f32(value.simple_value)
        elif value.HasField("histo"):
            histo = value.histo
            # min/max are float32 values; num, sum and sum_squares are TF's doubles, written as-is.
            histograms[value.tag] = {
                "min": f32(histo.min),
                "max": f32(histo.max),
                "num": int(histo.num),
                "sum": float(histo.sum),
                "sum_squares": float(histo.sum_squares),
            }
        else:
            raise ValueError(f"unexpected summary value kind for tag {value.tag!r}")
    return dict(sorted(scalars.items())), dict(sorted(histograms.items()))


def run_step(sess: tf.compat.v1.Session, handles: dict[str, Any], feed: dict) -> bytes:
    """One update and its summaries in a single ``Session.run``; b"" when there are no summaries."""
    if handles["summary"] is None:  # merge_all() returns None when optimize_loss added no summary
        sess.run(handles["train"], feed_dict=feed)
        return b""
    _, serialized = sess.run([handles["train"], handles["summary"]], feed_dict=feed)
    return serialized


def run_case(case: Case, initial: dict[str, np.ndarray], batches: list[dict]) -> list[dict]:
    """Train one case in a fresh graph; return the fixture's per-step records."""
    records = []
    with tf.Graph().as_default():
        handles = build_graph(case, initial)
        with tf.compat.v1.Session(config=session_config()) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for batch in batches[: case.steps]:
                feed = {handles["x"]: batch["x"], handles["y"]: batch["y"]}
                step_before = int(sess.run(handles["global_step"]))
                serialized = run_step(sess, handles, feed)
                params = sess.run(handles["params"])
                scalars, histograms = parse_summary(serialized)
                records.append(
                    {
                        "global_step": step_before,
                        "summaries": scalars,
                        "histograms": histograms,
                        "params": {name: f32_list(params[name]) for name in PARAM_NAMES},
                    }
                )
    return records


def case_record(case: Case, initial: dict[str, np.ndarray], batches: list[dict]) -> dict:
    """The fixture entry of one case: its options, inputs and TF's per-step outputs."""
    return {
        "description": case.description,
        "optimizer": case.optimizer,
        "learning_rate": case.learning_rate,
        "learning_rate_decay": case.learning_rate_decay,
        "clip_gradients": case.clip_gradients,
        "gradient_multipliers": case.gradient_multipliers,
        "variables": case.variables,
        "summaries": case.summaries,
        "increment_global_step": case.increment_global_step,
        "initial_params": {name: f32_list(initial[name]) for name in PARAM_NAMES},
        "batches": [{"x": f32_list(b["x"]), "y": f32_list(b["y"])} for b in batches[: case.steps]],
        "steps": run_case(case, initial, batches),
    }


# --------------------------------------------------------------------------------------------
# Reporting which steps clipped
# --------------------------------------------------------------------------------------------


def summary_value(scalars: dict[str, float], suffix: str) -> float | None:
    """The scalar whose tag ends with ``suffix`` (tags carry the optimize_loss name scope)."""
    hits = [value for tag, value in scalars.items() if tag.endswith(suffix)]
    if len(hits) > 1:
        raise ValueError(f"several summaries end with {suffix!r}")
    return hits[0] if hits else None


def clip_threshold(case: Case, scalars: dict[str, float]) -> float | None:
    """The norm above which this step clips (static_max_norm can clip below the adaptive one)."""
    if case.clip_gradients is None:
        return None
    if isinstance(case.clip_gradients, float):
        return case.clip_gradients
    return summary_value(scalars, "global_norm/adaptive_max_gradient_norm")


def describe_clipping(case: Case, steps: list[dict]) -> tuple[list[int], list[int]]:
    """Indices of the steps that clipped, and of those whose norm is borderline to the threshold."""
    clipped, borderline = [], []
    for index, step in enumerate(steps):
        scalars = step["summaries"]
        norm = summary_value(scalars, "global_norm/gradient_norm")
        after = summary_value(scalars, "global_norm/clipped_gradient_norm")
        if norm is None or after is None:
            continue
        if after < norm * (1.0 - 1e-6):
            clipped.append(index)
        threshold = clip_threshold(case, scalars)
        if threshold is not None and abs(norm - threshold) <= BORDERLINE_RTOL * norm:
            borderline.append(index)
    return clipped, borderline


# optimize_loss names its learning-rate summary "learning_rate", but its learning-rate variable
# already took that op name in the same scope, so the tag comes out as "OptimizeLoss/learning_rate_1".
LR_TAG = re.compile(r"learning_rate(_\d+)?$")


def print_case(name: str, case: Case, steps: list[dict]) -> None:
    """One line (or two) per case on stdout."""
    norms = [summary_value(s["summaries"], "global_norm/gradient_norm") for s in steps]
    shown = " ".join("-" if n is None else f"{n:.3g}" for n in norms)
    clipped, borderline = describe_clipping(case, steps)
    print(f"{name:26s} steps={len(steps):2d} clipped={clipped} norms=[{shown}]")
    if borderline:
        print(f"{'':26s} WARNING: borderline clipping decision at steps {borderline}")
    lr_items = [(tag, value) for s in steps for tag, value in s["summaries"].items() if LR_TAG.search(tag)]
    if lr_items:
        tags = sorted({tag for tag, _ in lr_items})
        print(f"{'':26s} learning-rate tags={tags} values={[f'{v:.4g}' for _, v in lr_items]}")


# --------------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------------


def make_schedules() -> list[dict]:
    """The decay.json schedule variants (every keyword argument spelled out)."""

    def entry(id_: str, fn: str, **kwargs: Any) -> dict:
        return {"id": id_, "fn": fn, "learning_rate": 0.1, "kwargs": kwargs}

    exp = {"decay_steps": 10, "decay_rate": 0.5}
    lin_cos = {"decay_steps": 10, "num_periods": 0.5, "alpha": 0.0, "beta": 0.001}
    poly = {"decay_steps": 10, "end_learning_rate": 0.0001, "power": 1.0, "cycle": False}
    restarts = {"first_decay_steps": 10, "t_mul": 2.0, "m_mul": 1.0, "alpha": 0.0}
    return [
        entry("exponential_decay", "exponential_decay", **exp, staircase=False),
        entry("exponential_decay_staircase", "exponential_decay", **exp, staircase=True),
        {
            "id": "piecewise_constant",
            "fn": "piecewise_constant",
            "learning_rate": None,
            "kwargs": {"boundaries": [10, 20], "values": [1.0, 0.5, 0.1]},
        },
        entry("polynomial_decay", "polynomial_decay", **poly),
        entry("polynomial_decay_power2", "polynomial_decay", **{**poly, "end_learning_rate": 0.01, "power": 2.0}),
        entry("polynomial_decay_cycle", "polynomial_decay", **{**poly, "cycle": True}),
        entry("natural_exp_decay", "natural_exp_decay", **exp, staircase=False),
        entry("natural_exp_decay_staircase", "natural_exp_decay", **exp, staircase=True),
        entry("inverse_time_decay", "inverse_time_decay", **exp, staircase=False),
        entry("inverse_time_decay_staircase", "inverse_time_decay", **exp, staircase=True),
        entry("cosine_decay", "cosine_decay", decay_steps=10, alpha=0.0),
        entry("cosine_decay_alpha", "cosine_decay", decay_steps=10, alpha=0.1),
        entry("cosine_decay_restarts", "cosine_decay_restarts", **restarts),
        entry("cosine_decay_restarts_tmul1", "cosine_decay_restarts", **{**restarts, "t_mul": 1.0}),
        entry(
            "cosine_decay_restarts_mmul_alpha",
            "cosine_decay_restarts",
            **{**restarts, "m_mul": 0.5, "alpha": 0.1},
        ),
        entry("linear_cosine_decay", "linear_cosine_decay", **lin_cos),
        entry(
            "linear_cosine_decay_periods_alpha_beta",
            "linear_cosine_decay",
            **{**lin_cos, "num_periods": 2.0, "alpha": 0.1, "beta": 0.01},
        ),
        # TF draws the noise with an unseeded random_normal, so only initial_variance=0.0 (noise
        # std 0) makes this schedule deterministic and comparable.
        entry(
            "noisy_linear_cosine_decay",
            "noisy_linear_cosine_decay",
            **lin_cos,
            initial_variance=0.0,
            variance_decay=0.55,
        ),
    ]


def evaluate_schedule(spec: dict, steps: list[int]) -> list[float]:
    """One schedule at each global step (int64), in a graph of its own as in training.

    Schedules sharing a graph would let grappler share sub-expressions between them, which changes how
    it rearranges their float32 arithmetic (an ulp here and there).
    """
    with tf.Graph().as_default():
        step = tf.compat.v1.placeholder(tf.int64, (), name="global_step")
        fn = getattr(tf.compat.v1.train, spec["fn"])
        if spec["learning_rate"] is None:
            kwargs = spec["kwargs"]
            tensor = fn(step, kwargs["boundaries"], kwargs["values"])
        else:
            tensor = fn(spec["learning_rate"], step, **spec["kwargs"])
        with tf.compat.v1.Session(config=session_config()) as sess:
            return [f32(sess.run(tensor, feed_dict={step: s})) for s in steps]


def evaluate_schedules(schedules: list[dict], steps: list[int]) -> list[dict]:
    """Every schedule evaluated at each step."""
    return [{**spec, "steps": steps, "values": evaluate_schedule(spec, steps)} for spec in schedules]


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def generator_info() -> dict:
    """Versions that produced the fixtures."""
    return {
        "tensorflow": tf.__version__,
        "tf_slim": importlib.metadata.version("tf-slim"),
        "numpy": np.__version__,
        "script": SCRIPT,
    }


_FLAT_LIST = re.compile(r"\[[^\[\]{}\"]*\]")


def write_json(data: dict, path: Path) -> None:
    """Write ``data`` with indent=1, but with each innermost list of numbers on one line."""
    text = json.dumps(data, indent=1, allow_nan=False)
    text = _FLAT_LIST.sub(lambda m: "[" + ", ".join(p.strip() for p in m.group(0)[1:-1].split(",")) + "]", text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def main() -> None:
    """Run all cases and schedules and write both fixtures."""
    initial = make_initial_params()
    batches = make_batches(MAX_STEPS)
    cases = make_cases()
    records = {}
    for name, case in cases.items():
        records[name] = case_record(case, initial, batches)
        print_case(name, case, records[name]["steps"])
    write_json(
        {
            "generator": generator_info(),
            "model": "loss = mean((tanh(x @ w1 + b1) @ w2 + b2 - y)**2), float32",
            "variable_names": {f"{name}:0": name for name in PARAM_NAMES},
            "cases": records,
        },
        FIXTURES / "optimize_loss.json",
    )
    schedules = evaluate_schedules(make_schedules(), list(range(31)))
    write_json({"generator": generator_info(), "schedules": schedules}, FIXTURES / "decay.json")


if __name__ == "__main__":
    main()
