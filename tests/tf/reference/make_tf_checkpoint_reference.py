"""Generate the ``tf.train.Saver`` checkpoints that ``TFCheckpoint`` is tested against, with real TF/tf-slim.

Run BY HAND, never by CI (it needs tensorflow-cpu and tf-slim, which the project does not depend on)::

    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu tf-slim
    /tmp/tfenv/bin/python tests/tf/reference/make_tf_checkpoint_reference.py

For every case, TF trains ``SAVE_AT`` steps with ``tf_slim``'s ``optimize_loss``, saves with
``tf.train.Saver`` (``tests/tf/reference/fixtures/tf_checkpoint/<case>/model.ckpt-<step>``, plus TF's
``checkpoint`` file), then trains ``CONTINUE`` more steps, recording after every step the variables (by TF
name), and the loss, learning rate and global norms TF summarised. ``tf_checkpoint.json`` holds the cases'
options, the batches of the continued steps and these records. A Lightning run that loads the checkpoint
must follow the recorded trajectory.

Models (float32, variables named the TF way so that the default name map applies):

* ``dense``: ``hidden = tanh(x @ hidden/kernel + hidden/bias)``, ``out = hidden @ out/kernel + out/bias``,
  mean squared error; kernels are (in, out) as in ``tf.layers.dense``.
* ``layers``: ``embed/embeddings`` (an embedding of 10 x 4, averaged over 3 tokens; looked up as a one-hot
  product, so that its gradient is dense as in torch) beside a 3x3 ``VALID``
  convolution ``conv/kernel`` (HWIO, 2 -> 3 channels, on 6x6 NHWC images), batch norm ``bn`` (training mode,
  epsilon 1e-3, its moving statistics updated through ``UPDATE_OPS``), relu and a mean over the image, then
  ``dense/kernel`` (7 -> 3) and ``dense/bias``: a model written the torch way with ``nn.Embedding``,
  ``nn.Conv2d``, ``nn.BatchNorm2d`` and ``nn.Linear`` loads it through the default name map.

Deterministic: fixed numpy seeds, no random TF ops, a single-threaded session, oneDNN off.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tf_reference import (  # TF's aliases are restored there, before tf_slim is imported
    adaptive,
    build_optimize_loss,
    f32,
    f32_list,
    generator_info,
    session_config,
    summary_value,
    write_json,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHECKPOINTS = FIXTURES / "tf_checkpoint"
SCRIPT = "tests/tf/reference/make_tf_checkpoint_reference.py"
SAVE_AT = 4
CONTINUE = 4
BATCH_SIZE = 8
N_IN, N_HIDDEN, N_OUT = 4, 8, 3
VOCABULARY, EMBEDDING, TOKENS = 10, 4, 3
IMAGE, CHANNELS, FILTERS = 6, 2, 3
BN_MOMENTUM, BN_EPSILON = 0.9, 1e-3  # torch: nn.BatchNorm2d(momentum=0.1, eps=1e-3)
SUMMARIES = ["loss", "learning_rate", "global_gradient_norm"]
EXP_DECAY = {"fn": "exponential_decay", "kwargs": {"decay_steps": 3, "decay_rate": 0.5, "staircase": False}}


@dataclass
class Case:
    """One run: ``SAVE_AT`` steps, a save, ``CONTINUE`` more steps."""

    description: str
    optimizer: str
    learning_rate: float
    model: str = "dense"
    name: str = "OptimizeLoss"
    clip_gradients: float | dict | None = None
    learning_rate_decay: dict | None = None
    gradient_multipliers: dict[str, float] | None = None
    summaries: list[str] = field(default_factory=lambda: list(SUMMARIES))
    spikes: dict[int, float] = field(default_factory=dict)  # step → factor on its targets (a gradient spike)


def make_cases() -> dict[str, Case]:
    cases = {
        f"opt_{name.lower()}": Case(f"{name} on the dense model", name, lr)
        for name, lr in [
            ("SGD", 0.05),
            ("Momentum", 0.05),
            ("Adagrad", 0.1),
            ("Adam", 0.01),
            ("RMSProp", 0.01),
            ("Ftrl", 0.1),
        ]
    }
    cases["adaptive"] = Case(
        "Momentum with adaptive_clipping_fn(std_factor=1.0, global_step=global_step, report_summary=True)",
        "Momentum",
        0.05,
        clip_gradients=adaptive(std_factor=1.0, global_step=True, report_summary=True),
        spikes={SAVE_AT + 1: 3.0},  # clips at the second continued step, by the loaded moving averages
    )
    cases["decay"] = Case(
        "Adam, exponential_decay(decay_steps=3, decay_rate=0.5): the rate continues from the saved step",
        "Adam",
        0.05,
        learning_rate_decay=EXP_DECAY,
    )
    cases["multipliers"] = Case(
        "SGD, gradient_multipliers {hidden/kernel: 0.5, out/bias: 3.0}, clip_gradients=2.0",
        "SGD",
        0.05,
        clip_gradients=2.0,
        gradient_multipliers={"hidden/kernel": 0.5, "out/bias": 3.0},
    )
    cases["name_scope"] = Case("Adam under optimize_loss(name='Train')", "Adam", 0.01, name="Train")
    cases["layers"] = Case(
        "Momentum on embedding + conv + batch norm + dense (HWIO and (in, out) kernels transposed)",
        "Momentum",
        0.05,
        model="layers",
    )
    return cases


# --------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------


def make_batches(model: str, steps: int, spikes: dict[int, float]) -> list[dict[str, np.ndarray]]:
    """Fixed batches; inputs as the torch model takes them (images NCHW, tokens int64)."""
    rng = np.random.default_rng(11)
    batches = []
    for step in range(steps):
        if model == "dense":
            x = rng.standard_normal((BATCH_SIZE, N_IN))
            y = 5.0 * np.sin(x[:, :N_OUT] * 2.0) + rng.standard_normal((BATCH_SIZE, N_OUT))
            y *= spikes.get(step, 1.0)
            batches.append({"x": x.astype(np.float32), "y": y.astype(np.float32)})
        else:
            images = rng.standard_normal((BATCH_SIZE, CHANNELS, IMAGE, IMAGE)).astype(np.float32)
            tokens = rng.integers(0, VOCABULARY, (BATCH_SIZE, TOKENS)).astype(np.int64)
            y = rng.standard_normal((BATCH_SIZE, N_OUT)).astype(np.float32)
            batches.append({"images": images, "tokens": tokens, "y": y})
    return batches


def initial_values(model: str) -> dict[str, np.ndarray]:
    """Initial variables by TF name (TF layouts: kernels (in, out) and HWIO)."""
    rng = np.random.default_rng(20251202)
    if model == "dense":
        shapes = {
            "hidden/kernel": (N_IN, N_HIDDEN),
            "hidden/bias": (N_HIDDEN,),
            "out/kernel": (N_HIDDEN, N_OUT),
            "out/bias": (N_OUT,),
        }
    else:
        shapes = {
            "embed/embeddings": (VOCABULARY, EMBEDDING),
            "conv/kernel": (3, 3, CHANNELS, FILTERS),
            "conv/bias": (FILTERS,),
            "dense/kernel": (EMBEDDING + FILTERS, N_OUT),
            "dense/bias": (N_OUT,),
        }
    return {name: (rng.standard_normal(shape) * 0.5).astype(np.float32) for name, shape in shapes.items()}


def variable(name: str, value: np.ndarray) -> tf.Variable:
    scope, leaf = name.rsplit("/", 1)
    with tf.compat.v1.variable_scope(scope):
        return tf.compat.v1.get_variable(leaf, initializer=value, use_resource=True)


def batch_norm(x: tf.Tensor) -> tf.Tensor:
    """TF1's batch norm in training mode (``bn/gamma``, ``bn/beta``, ``bn/moving_mean``, ``bn/moving_variance``),
    written out: the moving variance takes the unbiased batch variance, as torch's ``running_var`` does, and
    its update runs through ``UPDATE_OPS`` (which ``optimize_loss`` runs with every step)."""
    with tf.compat.v1.variable_scope("bn"):
        gamma = tf.compat.v1.get_variable("gamma", initializer=np.ones(FILTERS, np.float32), use_resource=True)
        beta = tf.compat.v1.get_variable("beta", initializer=np.zeros(FILTERS, np.float32), use_resource=True)
        moving = {
            name: tf.compat.v1.get_variable(name, initializer=init, trainable=False, use_resource=True)
            for name, init in (
                ("moving_mean", np.zeros(FILTERS, np.float32)),
                ("moving_variance", np.ones(FILTERS, np.float32)),
            )
        }
    mean, variance = tf.nn.moments(x, axes=(0, 1, 2))
    count = float(np.prod(x.shape[:3]))
    for name, value in (("moving_mean", mean), ("moving_variance", variance * (count / (count - 1.0)))):
        update = moving[name].assign_sub((moving[name] - value) * (1.0 - BN_MOMENTUM))
        tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.UPDATE_OPS, update)
    return tf.nn.batch_normalization(x, mean, variance, beta, gamma, BN_EPSILON)


def build_model(model: str, initial: dict[str, np.ndarray]) -> tuple[dict[str, Any], tf.Tensor]:
    """Placeholders and the loss."""
    params = {name: variable(name, value) for name, value in initial.items()}
    if model == "dense":
        x = tf.compat.v1.placeholder(tf.float32, (BATCH_SIZE, N_IN), name="x")
        y = tf.compat.v1.placeholder(tf.float32, (BATCH_SIZE, N_OUT), name="y")
        hidden = tf.tanh(tf.matmul(x, params["hidden/kernel"]) + params["hidden/bias"])
        prediction = tf.matmul(hidden, params["out/kernel"]) + params["out/bias"]
        return {"x": x, "y": y}, tf.reduce_mean(tf.square(prediction - y))
    images = tf.compat.v1.placeholder(tf.float32, (BATCH_SIZE, CHANNELS, IMAGE, IMAGE), name="images")
    tokens = tf.compat.v1.placeholder(tf.int64, (BATCH_SIZE, TOKENS), name="tokens")
    y = tf.compat.v1.placeholder(tf.float32, (BATCH_SIZE, N_OUT), name="y")
    # A one-hot product rather than embedding_lookup: the gradient is dense, as torch's nn.Embedding's is.
    # With embedding_lookup TF applies sparse updates (Momentum, Adam ... leave the rows absent from the batch
    # alone), which TF1's dense optimizers here do not reproduce.
    one_hot = tf.one_hot(tokens, VOCABULARY, dtype=tf.float32)
    embedded = tf.reduce_mean(tf.einsum("btv,vd->btd", one_hot, params["embed/embeddings"]), axis=1)
    nhwc = tf.transpose(images, (0, 2, 3, 1))
    conv = tf.nn.conv2d(nhwc, params["conv/kernel"], strides=1, padding="VALID") + params["conv/bias"]
    normed = batch_norm(conv)
    pooled = tf.reduce_mean(tf.nn.relu(normed), axis=(1, 2))
    features = tf.concat([embedded, pooled], axis=1)
    prediction = tf.matmul(features, params["dense/kernel"]) + params["dense/bias"]
    loss = tf.reduce_mean(tf.square(prediction - y))
    return {"images": images, "tokens": tokens, "y": y}, loss


# --------------------------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------------------------


def run_case(case_name: str, case: Case) -> dict[str, Any]:
    initial = initial_values(case.model)
    batches = make_batches(case.model, SAVE_AT + CONTINUE, case.spikes)
    folder = CHECKPOINTS / case_name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    records = []
    with tf.Graph().as_default():
        feeds, loss = build_model(case.model, initial)
        global_step = tf.compat.v1.train.get_or_create_global_step()
        train_op = build_optimize_loss(case, loss, global_step, name=case.name)
        summary_op = tf.compat.v1.summary.merge_all()
        saved_names = sorted(v.op.name for v in tf.compat.v1.global_variables())
        saver = tf.compat.v1.train.Saver(max_to_keep=1)
        with tf.compat.v1.Session(config=session_config()) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for index, batch in enumerate(batches):
                if index == SAVE_AT:
                    saver.save(sess, str(folder / "model.ckpt"), global_step=global_step, write_meta_graph=False)
                feed = {feeds[key]: value for key, value in batch.items()}
                step_before = int(sess.run(global_step))
                _, serialized = sess.run([train_op, summary_op], feed_dict=feed)
                if index < SAVE_AT:
                    continue
                summaries = tf.compat.v1.Summary.FromString(serialized).value
                scalars = {value.tag: f32(value.simple_value) for value in summaries}
                values = sess.run({v.op.name: v for v in tf.compat.v1.global_variables()})
                records.append(
                    {
                        "global_step": step_before,
                        "loss": summary_value(scalars, "/loss"),
                        "learning_rate": summary_value(scalars, "learning_rate_1"),
                        "gradient_norm": summary_value(scalars, "global_norm/gradient_norm"),
                        "clipped_gradient_norm": summary_value(scalars, "global_norm/clipped_gradient_norm"),
                        "variables": {
                            name: f32_list(value)
                            for name, value in sorted(values.items())
                            if name != "global_step" and not name.endswith("learning_rate")
                        },
                    }
                )
    # The checkpoint's path inside the fixture folder is relative, so the folder can move.
    (folder / "checkpoint").write_text(
        f'model_checkpoint_path: "model.ckpt-{SAVE_AT}"\nall_model_checkpoint_paths: "model.ckpt-{SAVE_AT}"\n'
    )
    to_feed = batches[SAVE_AT:]
    return {
        "description": case.description,
        "model": case.model,
        "optimizer": case.optimizer,
        "learning_rate": case.learning_rate,
        "learning_rate_decay": case.learning_rate_decay,
        "clip_gradients": case.clip_gradients,
        "gradient_multipliers": case.gradient_multipliers,
        "name": case.name,
        "saved_at": SAVE_AT,
        "saved_variables": saved_names,
        "batches": [{key: value.tolist() for key, value in batch.items()} for batch in to_feed],
        "steps": records,
    }


def main() -> None:
    cases = {name: run_case(name, case) for name, case in make_cases().items()}
    for name, record in cases.items():
        norms = [f"{step['gradient_norm']:.3g}" for step in record["steps"]]
        print(f"{name:12s} saved={len(record['saved_variables'])} variables norms={norms}")
    write_json(
        {
            "generator": {**generator_info(), "script": SCRIPT},
            "save_at": SAVE_AT,
            "continue": CONTINUE,
            "cases": cases,
        },
        FIXTURES / "tf_checkpoint.json",
    )


if __name__ == "__main__":
    main()
