"""``TFCheckpoint``: continue a TF1 run in Lightning from its ``tf.train.Saver`` checkpoint.

What is loaded, and where it comes from (``<scope>`` is ``optimize_loss``'s ``name``, the
:class:`~lightning_optloss.OptimizeLoss` callback's ``name``, ``OptimizeLoss`` by default):

=====================================  ===================================================================
TF checkpoint                          Lightning
=====================================  ===================================================================
``a/b/kernel``, ``a/b/bias`` ...       the module's parameters and buffers (:mod:`.checkpoint_names`)
``<scope>/<var>/<Slot>``               the slots of the TF1 optimizer built by name (:data:`SLOTS`)
``<scope>/beta1_power``, ``_2``        Adam's powers (every parameter's)
``global_step``                        :attr:`OptimizeLoss.global_step` of every OptimizeLoss
``<scope>/AdaptiveMaxNorm/mean``, ...  the moving averages of ``adaptive_clipping_fn``
=====================================  ===================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_optloss.callback import OptimizeLoss
from lightning_optloss.common import validation
from lightning_optloss.distributed import strategies
from lightning_optloss.gradients.adaptive_clipping import AdaptiveClipping
from lightning_optloss.tf import optimizers as tf_optimizers
from lightning_optloss.tf.checkpoint_names import (
    SLOT_SUFFIXES,
    NameMap,
    TFCheckpointReader,
    VariableKinds,
    match_names,
    resolve_prefix,
    sort_variables,
    tensor_names,
    to_torch_layout,
)
from lightning_optloss.tf.configure import LearningRateDecay

_OWNER = "TFCheckpoint"

# TF1 optimizer → (its slot names' base, {state key: slot suffix}); RMSProp's depend on ``centered``.
SLOTS: dict[type[Optimizer], tuple[str, Callable[[dict[str, Any]], dict[str, str]]]] = {
    tf_optimizers.TFGradientDescent: ("SGD", lambda group: {}),
    tf_optimizers.TFMomentum: ("Momentum", lambda group: {"momentum": "Momentum"}),
    tf_optimizers.TFAdagrad: ("Adagrad", lambda group: {"accumulator": "Adagrad"}),
    tf_optimizers.TFAdam: ("Adam", lambda group: {"m": "Adam", "v": "Adam_1"}),
    tf_optimizers.TFRMSProp: (
        "RMSProp",
        lambda group: (
            {"rms": "RMSProp", "mg": "RMSProp_1", "momentum": "RMSProp_2"}
            if group["centered"]
            else {"rms": "RMSProp", "momentum": "RMSProp_1"}
        ),
    ),
    tf_optimizers.TFFtrl: ("Ftrl", lambda group: {"accum": "Ftrl", "linear": "Ftrl_1"}),
}
"""The TF1 optimizers whose slots :class:`TFCheckpoint` loads, with TF's slot names (TF creates them in this
order: the optimizer's name, then ``_1``, ``_2``)."""


class TFCheckpoint(Callback):
    """Load a TF1 ``tf.train.Saver`` checkpoint at the start of ``fit``: weights, optimizer slots, global step.

    At ``on_fit_start`` (optimizers built, nothing trained yet) it copies into the module its variables,
    into the TF1 optimizers built by name (``configure_optimizers(self, "Adam", ...)``) their slots (Adam's
    ``m``, ``v`` and powers; Momentum's accumulator; Adagrad's; RMSProp's mean square and momentum; Ftrl's
    accumulator and linear term), into every :class:`~lightning_optloss.OptimizeLoss` TF's ``global_step``
    (so a decay schedule, noise seeds and summary steps continue from it; the next update uses the schedule's
    rate at that step), and into ``adaptive_clipping_fn`` its moving averages. Slots and optimizer variables
    are read under each OptimizeLoss's ``name`` (TF's ``optimize_loss(name=...)`` scope).

    The checkpoint is read and every name, shape and slot checked before anything changes: at ``setup``
    (names, shapes, data) and at ``on_fit_start`` (optimizers). A fit resumed from a Lightning checkpoint
    (``trainer.fit(..., ckpt_path=...)``) takes precedence: then nothing is loaded, with a warning; so does a
    later ``fit`` with the same callback (:attr:`loaded` is True once it has loaded).

    Default name map: ``a/b/kernel`` → ``a.b.weight``, kernels transposed (dense (in, out) → (out, in),
    convolutions HWIO → OIHW, 1-d and 3-d likewise); ``bias`` → ``bias``; batch norm's ``gamma``, ``beta``,
    ``moving_mean``, ``moving_variance`` → ``weight``, ``bias``, ``running_mean``, ``running_var``;
    ``embeddings`` → ``weight``; any other name with ``/`` → ``.``. ``python -m lightning_optloss.tf_checkpoint
    inspect PATH --module pkg.Module`` prints the mapping without training.

    Args:
        path: A checkpoint prefix (``.../model.ckpt-4000``, the name before ``.index``) or a folder (its
            latest checkpoint, from TF's ``checkpoint`` file). Must exist at construction.
        name_map: Overrides the default map: a dict ``{TF name: parameter name}`` (names it lacks keep the
            default), or a callable ``fn(tf_name) -> parameter name or None`` (None: leave the variable
            unused; picklable for ``ddp_spawn``: a function, not a lambda). A mapped TF variable whose last part
            is ``kernel`` is still transposed.
        strict: With True (default), every trainable parameter must receive a value, every TF model variable
            must be used, every parameter of a TF1 optimizer must find its slots, and the optimizers must be
            TF1 optimizers built by name; otherwise a ``ValueError`` lists what is unmatched, with the
            closest names. With False these are warnings, and what is missing keeps its initial value.

    Raises:
        FileNotFoundError: at construction, when ``path`` holds no checkpoint.
        ImportError: at ``setup``, without TensorFlow (``pip install 'lightning-optloss[tf]'``).
        ValueError: at ``setup`` or ``on_fit_start``, before any update: a damaged or partial checkpoint,
            unmatched names (``strict``), a shape that does not fit even transposed (both shapes named), slots
            of another optimizer than the configured one, an unsupported strategy (FSDP1, FSDP2, DeepSpeed).

    Example:
        >>> import tempfile
        >>> from lightning_optloss import TFCheckpoint
        >>> TFCheckpoint(tempfile.mkdtemp())  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        FileNotFoundError: TFCheckpoint: `path` ... is a folder without TF's 'checkpoint' file; ...

        In a training script::

            trainer = pl.Trainer(callbacks=[OptimizeLoss(clip_gradients=adaptive_clipping_fn()),
                                            TFCheckpoint("tf_run/")])
            trainer.fit(model)  # model.configure_optimizers: configure_optimizers(self, "Adam", 0.01, decay_fn)
    """

    def __init__(self, path: str | Path, name_map: NameMap | None = None, strict: bool = True) -> None:
        if name_map is not None and not (isinstance(name_map, Mapping) or callable(name_map)):
            raise validation.invalid(
                _OWNER, "name_map", "None, a dict {TF name: parameter name} or a callable fn(tf_name)", name_map
            )
        if isinstance(name_map, Mapping):
            bad = {k: v for k, v in name_map.items() if not isinstance(k, str) or not isinstance(v, str)}
            if bad:
                raise validation.invalid(_OWNER, "name_map", "a dict of str TF names to str parameter names", bad)
        self.prefix = resolve_prefix(_OWNER, path)
        self.name_map = name_map
        self.strict = validation.boolean(_OWNER, "strict", strict)
        self.loaded = False
        self._values: dict[str, np.ndarray] = {}
        self._pairs: dict[str, str] = {}
        self._kinds: VariableKinds | None = None
        self._reader: TFCheckpointReader | None = None

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles callbacks; the reader is rebuilt at setup
        return {**self.__dict__, "_reader": None, "_values": {}}

    # ------------------------------------------------------------------ setup: names, shapes, data

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.loaded:
            return
        strategies.check_whole_tensor_loading(_OWNER, trainer.strategy)
        self._reader = TFCheckpointReader(_OWNER, self.prefix)
        self._kinds = sort_variables(self._reader.shapes, _scopes(trainer))
        match = match_names(_OWNER, self._kinds.model, tensor_names(pl_module), self.name_map)
        if match.unused_tf or match.unmatched_torch:
            self._refuse_or_warn(
                f"the TF checkpoint {self.prefix!r} and {type(pl_module).__name__} do not match: "
                f"{match.describe_unmatched()}. Fix the names with `name_map` (see `python -m "
                "lightning_optloss.tf_checkpoint inspect PATH --module pkg.Module`), or pass strict=False."
            )
        targets = dict(pl_module.named_parameters()) | dict(pl_module.named_buffers())
        self._pairs = match.pairs
        self._values = {
            tf_name: to_torch_layout(_OWNER, tf_name, self._reader.get(tf_name), tuple(targets[name].shape), name)
            for tf_name, name in match.pairs.items()
        }

    def _refuse_or_warn(self, message: str, instead: str = "") -> None:
        """A ``ValueError`` with ``strict``, else a warning saying what happens ``instead``."""
        if self.strict:
            raise ValueError(f"{_OWNER}: {message}")
        rank_zero_warn(f"{_OWNER}: {message}{instead}")

    # ------------------------------------------------------------------ on_fit_start: optimizers, then load

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.loaded:
            rank_zero_warn(
                f"{_OWNER}: the TF checkpoint {self.prefix!r} was loaded by an earlier fit of this callback; "
                "this fit goes on from the current weights and loads nothing."
            )
            return
        if trainer.ckpt_path is not None:
            rank_zero_warn(
                f"{_OWNER}: fit resumes the Lightning checkpoint {str(trainer.ckpt_path)!r}, which takes "
                f"precedence: nothing is loaded from the TF checkpoint {self.prefix!r}."
            )
            self._release()
            return
        tensors = dict(pl_module.named_parameters()) | dict(pl_module.named_buffers())
        tf_names = {id(tensors[name]): tf_name for tf_name, name in self._pairs.items()}
        states = [self._optimizer_states(optimizer, tf_names) for optimizer in trainer.optimizers]
        callbacks = [callback for callback in trainer.callbacks if isinstance(callback, OptimizeLoss)]
        clip_states = self._clip_states(callbacks)
        with torch.no_grad():
            for tf_name, name in self._pairs.items():
                tensors[name].copy_(torch.from_numpy(self._values[tf_name]))
        for optimizer, by_param in zip(trainer.optimizers, states, strict=True):
            optimizer.state.update(by_param)
        for callback, state in clip_states.items():
            callback.clip_gradients.load_state_dict(state)
        self._load_global_step(trainer, callbacks)
        self.loaded = True
        self._release()

    def _load_global_step(self, trainer: pl.Trainer, callbacks: list[OptimizeLoss]) -> None:
        if self._kinds.global_step is None:
            return
        step = int(self._reader.get(self._kinds.global_step))
        if not callbacks:
            rank_zero_warn(
                f"{_OWNER}: the checkpoint's global_step ({step}) has no OptimizeLoss callback to go to; decay "
                "schedules restart from step 0. Add OptimizeLoss to the Trainer's callbacks."
            )
            return
        for callback in callbacks:
            callback.global_step = step
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, LearningRateDecay):
                config.scheduler.refresh_rates()

    def _optimizer_states(self, optimizer: Optimizer, tf_names: dict[int, str]) -> dict[Tensor, dict[str, Any]]:
        """The state of every parameter of ``optimizer`` from the checkpoint's slots (checked, not yet set)."""
        params = [param for group in optimizer.param_groups for param in group["params"]]
        names = [tf_names[id(param)] for param in params if id(param) in tf_names]
        held = {suffix for name in names for suffix in self._kinds.slots.get(name, {})}
        families = sorted({SLOT_SUFFIXES[suffix] for suffix in held})
        spec = SLOTS.get(type(optimizer))
        if spec is None:
            self._refuse_or_warn(
                f"the optimizer {type(optimizer).__name__} is not one of TF1's optimizers built by name "
                f"({', '.join(tf_optimizers.OPTIMIZER_CLS_NAMES)}), so the checkpoint's slots"
                f"{' (' + ', '.join(families) + ')' if families else ''} cannot be mapped onto its state; build "
                "it with configure_optimizers(self, '<TF name>', ...), or pass strict=False to load the weights "
                "only."
            )
            return {}
        family, _ = spec
        foreign = [name for name in families if name != family]
        if foreign:
            raise ValueError(
                f"{_OWNER}: the checkpoint holds slots of the {', '.join(foreign)} optimizer, but the configured "
                f"optimizer is {family} ({type(optimizer).__name__}); configure the optimizer the TF run used."
            )
        states = {}
        for group in optimizer.param_groups:
            table = spec[1](group)
            for param in group["params"]:
                tf_name = tf_names.get(id(param))
                if tf_name is not None and table:
                    state = self._slot_state(tf_name, param, table)
                    if state is not None:
                        states[param] = state
        return states

    def _slot_state(self, tf_name: str, param: Tensor, table: dict[str, str]) -> dict[str, Any] | None:
        slots = self._kinds.slots.get(tf_name, {})
        missing = [suffix for suffix in table.values() if suffix not in slots]
        if missing:
            self._refuse_or_warn(
                f"the checkpoint has no slot {', '.join(missing)} for {tf_name!r} (was this variable trained in "
                "TF, and under this OptimizeLoss name?).",
                " Its slots start from their initial values.",
            )
            return None
        state: dict[str, Any] = {}
        for key, suffix in table.items():
            value = to_torch_layout(_OWNER, tf_name, self._reader.get(slots[suffix]), tuple(param.shape), key)
            state[key] = torch.tensor(value, dtype=param.dtype, device=param.device)
        if "m" in table:  # Adam: the powers of the next update, beside the slots in the same scope
            scope = slots["Adam"][: -len(f"/{tf_name}/Adam")]
            for power in ("beta1_power", "beta2_power"):
                state[power] = float(np.float32(self._reader.get(f"{scope}/{power}")))
        return state

    def _clip_states(self, callbacks: list[OptimizeLoss]) -> dict[OptimizeLoss, dict[str, Tensor]]:
        """Adaptive clipping's moving averages for each OptimizeLoss that clips adaptively."""
        states = {}
        for callback in callbacks:
            names = {key: f"{callback.name}/AdaptiveMaxNorm/{key}" for key in ("mean", "sq_mean")}
            present = all(name in self._reader.shapes for name in names.values())
            if isinstance(callback.clip_gradients, AdaptiveClipping):
                if present:
                    states[callback] = {
                        key: torch.tensor(self._reader.get(name), dtype=torch.float32) for key, name in names.items()
                    }
                else:
                    self._refuse_or_warn(
                        f"OptimizeLoss {callback.name!r} clips adaptively, but the checkpoint has no "
                        f"{names['mean']!r}.",
                        " Its moving averages start at 0.",
                    )
            elif present:
                rank_zero_warn(
                    f"{_OWNER}: the checkpoint holds adaptive clipping's moving averages ({names['mean']!r}), but "
                    f"OptimizeLoss {callback.name!r} has clip_gradients={validation.show(callback.clip_gradients)}; "
                    "they are not used."
                )
        return states

    def _release(self) -> None:
        self._reader = None
        self._values = {}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()


def _scopes(trainer: pl.Trainer) -> list[str]:
    """The ``optimize_loss`` name scopes to look for optimizer variables in: the OptimizeLoss names."""
    names = [callback.name for callback in trainer.callbacks if isinstance(callback, OptimizeLoss)]
    return names or ["OptimizeLoss"]
