"""Reading a TF1 ``tf.train.Saver`` checkpoint, and mapping its variable names to a torch module's.

Pure functions on names, shapes and arrays; no Lightning. :mod:`lightning_optloss.tf.checkpoint` applies
what they compute.

TF1's names: a model variable ``dense/kernel``; under ``optimize_loss(name=...)`` (default ``OptimizeLoss``)
the optimizer's slots ``OptimizeLoss/dense/kernel/Adam``, its non-slot variables ``OptimizeLoss/beta1_power``,
the rate ``OptimizeLoss/learning_rate``, adaptive clipping's ``OptimizeLoss/AdaptiveMaxNorm/mean``; and
``global_step``.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lightning_optloss.common import validation

NameMap = Mapping[str, str] | Callable[[str], str | None]

# The last part of a TF name → the torch one (Keras/tf.layers conventions → torch.nn's).
LEAF_NAMES = {
    "kernel": "weight",
    "bias": "bias",
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
    "embeddings": "weight",
}
# A TF kernel of this many dimensions → the permutation giving torch's layout.
KERNEL_PERMUTATIONS = {
    2: ((1, 0), "(in, out) -> (out, in)"),
    3: ((2, 1, 0), "WIO -> OIW"),
    4: ((3, 2, 0, 1), "HWIO -> OIHW"),
    5: ((4, 3, 0, 1, 2), "DHWIO -> OIDHW"),
}
# The slots TF1's optimizers create, by the suffix of their names (the optimizer's own name, then _1, _2).
SLOT_SUFFIXES = {
    "Adam": "Adam",
    "Adam_1": "Adam",
    "Momentum": "Momentum",
    "Adagrad": "Adagrad",
    "RMSProp": "RMSProp",
    "RMSProp_1": "RMSProp",
    "RMSProp_2": "RMSProp",
    "Ftrl": "Ftrl",
    "Ftrl_1": "Ftrl",
}
# Optimizer variables that are not slots of one variable, and what uses them.
SCOPE_VARIABLES = {
    "beta1_power": "Adam",
    "beta2_power": "Adam",
    "learning_rate": "optimize_loss",
    "AdaptiveMaxNorm/mean": "adaptive clipping",
    "AdaptiveMaxNorm/sq_mean": "adaptive clipping",
}
GLOBAL_STEP = "global_step"
EXTRA = "tf"  # pip install lightning-optloss[tf]


def import_tensorflow() -> Any:
    """TensorFlow, or an error naming the extra that installs it (TF's C++ info logs off unless asked for)."""
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as missing:
        raise ImportError(
            "Reading TF checkpoints needs TensorFlow's own reader: pip install 'lightning-optloss[tf]' "
            f"(installs tensorflow-cpu); importing tensorflow failed: {missing}"
        ) from missing
    return tf


def resolve_prefix(owner: str, path: str | Path) -> str:
    """The checkpoint prefix ``path`` names: itself (``.../model.ckpt-4000``), or a folder's latest checkpoint.

    A folder's latest is the ``model_checkpoint_path`` of TF's ``checkpoint`` file (relative to the folder
    unless absolute). Raises ``FileNotFoundError`` naming what is missing.
    """
    if not isinstance(path, (str, Path)) or not str(path):
        raise validation.invalid(owner, "path", "a checkpoint prefix or a folder (str or Path)", path)
    path = Path(path).expanduser()
    if path.is_dir():
        index = path / "checkpoint"
        if not index.is_file():
            raise FileNotFoundError(
                f"{owner}: `path` {str(path)!r} is a folder without TF's 'checkpoint' file; pass a checkpoint "
                "prefix such as '.../model.ckpt-4000' (the name before .index)."
            )
        latest = _latest(index)
        if latest is None:
            raise ValueError(f"{owner}: {str(index)!r} names no model_checkpoint_path; is it damaged?")
        path = Path(latest) if Path(latest).is_absolute() else path / latest
    if not Path(f"{path}.index").is_file():
        found = sorted(p.name for p in path.parent.glob(f"{path.name}*"))[:6] if path.parent.is_dir() else []
        raise FileNotFoundError(
            f"{owner}: no TF checkpoint at `path` {str(path)!r}: {f'{path}.index'!r} does not exist"
            + (f" (found: {', '.join(found)})" if found else "")
            + "; pass the prefix before .index/.data-*, or the folder holding TF's 'checkpoint' file."
        )
    return str(path)


def _latest(index: Path) -> str | None:
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model_checkpoint_path":
            return value.strip().strip('"')
    return None


class TFCheckpointReader:
    """The variables of one checkpoint (names, shapes), read on demand with ``tf.train.load_checkpoint``.

    Args:
        owner: Who reads (for errors).
        prefix: A checkpoint prefix (:func:`resolve_prefix`).

    Raises:
        ImportError: without TensorFlow (names the ``[tf]`` extra).
        ValueError: for a damaged or partial checkpoint (TF's message included).
    """

    def __init__(self, owner: str, prefix: str) -> None:
        tf = import_tensorflow()
        self.owner = owner
        self.prefix = prefix
        try:
            self._reader = tf.train.load_checkpoint(prefix)
            self.shapes: dict[str, tuple[int, ...]] = {
                name: tuple(shape) for name, shape in self._reader.get_variable_to_shape_map().items()
            }
        except Exception as error:  # TF raises DataLossError, NotFoundError, OpError...: all mean "unreadable"
            raise ValueError(f"{owner}: cannot read the TF checkpoint {prefix!r}: {_first_line(error)}") from error

    def get(self, name: str) -> np.ndarray:
        """The value of variable ``name``; a ``ValueError`` when its data is damaged or missing."""
        try:
            return np.asarray(self._reader.get_tensor(name))
        except Exception as error:
            raise ValueError(
                f"{self.owner}: cannot read {name!r} from the TF checkpoint {self.prefix!r} (damaged or partial "
                f"data file?): {_first_line(error)}"
            ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:500]


# --------------------------------------------------------------------------------------------- names


@dataclass(frozen=True)
class VariableKinds:
    """A checkpoint's names sorted by role, for the ``optimize_loss`` scopes ``scopes``."""

    model: list[str]  # the module's variables (weights, batch-norm statistics)
    slots: dict[str, dict[str, str]]  # model variable → {slot suffix: full name}
    scope: dict[str, str]  # "<scope>/beta1_power" ... → what uses it
    global_step: str | None


def sort_variables(names: Iterable[str], scopes: Iterable[str]) -> VariableKinds:
    """Split checkpoint names into model variables, optimizer slots and optimizer variables."""
    names = sorted(names)
    scopes = sorted(set(scopes), key=len, reverse=True)
    slots: dict[str, dict[str, str]] = {}
    scope_variables: dict[str, str] = {}
    model = []
    for name in names:
        if name == GLOBAL_STEP:
            continue
        scope = next((s for s in scopes if name.startswith(s + "/")), None)
        rest = name[len(scope) + 1 :] if scope else None
        if rest is not None and rest in SCOPE_VARIABLES:
            scope_variables[name] = SCOPE_VARIABLES[rest]
            continue
        owner_var, _, suffix = (rest or "").rpartition("/")
        if rest is not None and suffix in SLOT_SUFFIXES and owner_var in names:
            slots.setdefault(owner_var, {})[suffix] = name
            continue
        model.append(name)
    return VariableKinds(model, slots, scope_variables, GLOBAL_STEP if GLOBAL_STEP in names else None)


def default_name(tf_name: str) -> str:
    """The default torch name of a TF variable: ``a/b/kernel`` → ``a.b.weight`` (see :data:`LEAF_NAMES`)."""
    *path, leaf = tf_name.split("/")
    return ".".join([*path, LEAF_NAMES.get(leaf, leaf)])


def mapped_name(owner: str, tf_name: str, name_map: NameMap | None) -> str | None:
    """The torch name for ``tf_name``: ``name_map``'s when it has one, else :func:`default_name`.

    A dict maps the names it holds; a callable returns a name, or None to leave the variable unused.
    """
    if name_map is None:
        return default_name(tf_name)
    if isinstance(name_map, Mapping):
        return name_map.get(tf_name, default_name(tf_name))
    result = name_map(tf_name)
    if result is not None and not isinstance(result, str):
        raise ValueError(
            f"{owner}: `name_map` {validation.callable_name(name_map)} returned {validation.show(result)} for "
            f"{tf_name!r}; it must return a parameter name (str) or None."
        )
    return result


def to_torch_layout(
    owner: str, tf_name: str, value: np.ndarray, target: tuple[int, ...], torch_name: str
) -> np.ndarray:
    """``value`` in the layout of the torch tensor of shape ``target``.

    Kernels (a TF name ending in ``kernel``) are permuted by their number of dimensions
    (:data:`KERNEL_PERMUTATIONS`: dense (in, out) → (out, in), convolutions HWIO → OIHW); other variables are
    taken as they are. A shape that still differs is an error naming both shapes and the transpose tried.
    """
    permutation, tried = None, "none (taken as is)"
    if tf_name.rsplit("/", 1)[-1] == "kernel" and value.ndim in KERNEL_PERMUTATIONS:
        permutation, tried = KERNEL_PERMUTATIONS[value.ndim]
        tried = f"{tried} {permutation}"
    converted = value if permutation is None else np.transpose(value, permutation)
    if tuple(converted.shape) != tuple(target):
        raise ValueError(
            f"{owner}: TF variable {tf_name!r} has shape {tuple(value.shape)}, {torch_name!r} has shape "
            f"{tuple(target)}; transpose tried: {tried}, giving {tuple(converted.shape)}. Map it elsewhere with "
            "`name_map`."
        )
    return np.ascontiguousarray(converted)


def closest(name: str, candidates: Iterable[str]) -> str:
    """``name`` with its closest candidates, for listings of unmatched names."""
    close = difflib.get_close_matches(name, list(candidates), n=2, cutoff=0.5)
    return f"{name!r} (closest: {', '.join(repr(c) for c in close)})" if close else repr(name)


@dataclass(frozen=True)
class NameMatch:
    """The mapping of a checkpoint's model variables onto a module's tensors."""

    pairs: dict[str, str]  # TF name → torch name
    unused_tf: list[str]  # model variables no torch tensor takes
    unmatched_torch: list[str]  # trainable parameters no TF variable fills

    def describe_unmatched(self) -> str:
        """Both sides' leftovers, each with its closest names on the other side."""
        lines = []
        if self.unmatched_torch:
            candidates = [default_name(name) for name in self.unused_tf]
            listed = ", ".join(closest(name, candidates) for name in self.unmatched_torch)
            lines.append(f"parameters without a TF value: {listed}")
        if self.unused_tf:
            listed = ", ".join(
                f"{name!r} -> {closest(default_name(name), self.unmatched_torch)}" for name in self.unused_tf
            )
            lines.append(f"TF variables not used (default name, closest parameters): {listed}")
        return "; ".join(lines)


def match_names(
    owner: str,
    model_variables: Iterable[str],
    tensors: Mapping[str, bool],
    name_map: NameMap | None,
) -> NameMatch:
    """Pair TF model variables with torch tensors.

    Args:
        owner: For errors.
        model_variables: The checkpoint's model variables (:func:`sort_variables`).
        tensors: The module's tensor names → whether the tensor must receive a value (trainable parameters
            True; buffers such as ``running_mean`` False).
        name_map: See :func:`mapped_name`.

    Raises:
        ValueError: when two TF variables map to one tensor.
    """
    pairs: dict[str, str] = {}
    unused = []
    taken: dict[str, str] = {}
    for tf_name in model_variables:
        target = mapped_name(owner, tf_name, name_map)
        if target is None or target not in tensors:
            unused.append(tf_name)
            continue
        if target in taken:
            raise ValueError(
                f"{owner}: TF variables {taken[target]!r} and {tf_name!r} both map to {target!r}; fix `name_map`."
            )
        taken[target] = tf_name
        pairs[tf_name] = target
    unmatched = [name for name, required in tensors.items() if required and name not in taken]
    return NameMatch(pairs, unused, unmatched)


def tensor_names(module: nn.Module) -> dict[str, bool]:
    """The module's tensors that can take a TF value: parameter and buffer names → whether one is required
    (trainable parameters)."""
    tensors = {name: param.requires_grad for name, param in module.named_parameters()}
    tensors.update({name: False for name, _ in module.named_buffers() if name not in tensors})
    return tensors
