"""The models and runs of the TF checkpoint fixtures (``tests/tf/reference/make_tf_checkpoint_reference.py``).

Shared by ``test_tf_checkpoint.py`` and the two-process run ``distributed/tf_checkpoint_ddp.py``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optloss import OptimizeLoss, adaptive_clipping_fn, configure_optimizers
from lightning_optloss.tf import decay
from lightning_optloss.tf.checkpoint_names import default_name

FIXTURES = Path(__file__).parent / "reference" / "fixtures"
CHECKPOINTS = FIXTURES / "tf_checkpoint"
REFERENCE = json.loads((FIXTURES / "tf_checkpoint.json").read_text())
CASES = REFERENCE["cases"]


class DenseModel(pl.LightningModule):
    """``out(tanh(hidden(x)))`` with mean squared error; ``nn.Linear`` layers (TF ``hidden/kernel`` ...)."""

    def __init__(self, case: dict[str, Any], optimizer: Any = None) -> None:
        super().__init__()
        torch.manual_seed(0)  # any initial values: the checkpoint replaces them
        self.hidden = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3)
        self.case = case
        self.optimizer = optimizer or case["optimizer"]

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(x)))

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        *inputs, y = batch
        return torch.mean(torch.square(self(*inputs) - y))

    def configure_optimizers(self) -> Any:
        schedule = self.case["learning_rate_decay"]
        decay_fn = schedule and functools.partial(getattr(decay, schedule["fn"]), **schedule["kwargs"])
        return configure_optimizers(self, self.optimizer, self.case["learning_rate"], decay_fn)


class LayersModel(DenseModel):
    """The fixture's ``layers`` model written the torch way: Embedding, Conv2d, BatchNorm2d, Linear."""

    def __init__(self, case: dict[str, Any], optimizer: Any = None) -> None:
        super().__init__(case, optimizer)
        del self.hidden, self.out
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3, eps=1e-3, momentum=0.1)
        self.dense = nn.Linear(7, 3)

    def forward(self, images: Tensor, tokens: Tensor) -> Tensor:
        pooled = torch.relu(self.bn(self.conv(images))).mean(dim=(2, 3))
        return self.dense(torch.cat([self.embed(tokens).mean(dim=1), pooled], dim=1))


MODELS = {"dense": DenseModel, "layers": LayersModel}
INPUTS = {"dense": ("x",), "layers": ("images", "tokens")}


def make_model(case: dict[str, Any], optimizer: Any = None) -> DenseModel:
    return MODELS[case["model"]](case, optimizer)


def make_callback(case: dict[str, Any]) -> OptimizeLoss:
    """The OptimizeLoss of the TF run (multipliers by torch name)."""
    clip = case["clip_gradients"]
    if isinstance(clip, dict):
        options = dict(clip["adaptive"])
        options["global_step"] = True if options["global_step"] else None
        clip = adaptive_clipping_fn(**options)
    multipliers = case["gradient_multipliers"]
    return OptimizeLoss(
        name=case["name"],
        clip_gradients=clip,
        gradient_multipliers=multipliers and {default_name(k): v for k, v in multipliers.items()},
        summaries=["loss", "learning_rate", "global_gradient_norm"],
    )


def make_dataset(case: dict[str, Any]) -> TensorDataset:
    """The continued steps' batches, one after the other."""
    tensors = []
    for key in (*INPUTS[case["model"]], "y"):
        dtype = torch.int64 if key == "tokens" else torch.float32
        tensors.append(torch.tensor([batch[key] for batch in case["batches"]], dtype=dtype).flatten(0, 1))
    return TensorDataset(*tensors)


def make_loader(case: dict[str, Any], batch_size: int | None = None, **kwargs: Any) -> DataLoader:
    size = batch_size or len(case["batches"][0]["y"])
    return DataLoader(make_dataset(case), batch_size=size, shuffle=False, **kwargs)


def tf_as_torch(case: dict[str, Any], model: nn.Module, variables: dict[str, list]) -> dict[str, np.ndarray]:
    """TF's recorded model variables under the module's names, in torch's layouts (the default name map)."""
    from lightning_optloss.tf.checkpoint_names import to_torch_layout

    shapes = {name: tuple(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    converted = {}
    for tf_name, value in variables.items():
        name = default_name(tf_name)
        if name in shapes and not tf_name.startswith(case["name"] + "/"):
            converted[name] = to_torch_layout("test", tf_name, np.asarray(value, np.float32), shapes[name], name)
    return converted


class RecordTensors(pl.Callback):
    """Parameters and buffers after every training batch."""

    def __init__(self) -> None:
        self.steps: list[dict[str, np.ndarray]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tensors = [*pl_module.named_parameters(), *pl_module.named_buffers()]
        self.steps.append({name: t.detach().cpu().numpy().copy() for name, t in tensors})
