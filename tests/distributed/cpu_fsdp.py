"""FSDP1 (Lightning's ``FSDPStrategy``) on CPU processes with gloo, for the tests only.

Lightning refuses ``FSDPStrategy`` without a GPU, but only when its type is exactly ``FSDPStrategy`` (a
subclass passes), and then builds ``FullyShardedDataParallel(device_id=None)`` on CPU, which torch refuses
("FSDP needs a non-CPU accelerator device"); ``device_id=torch.device("cpu")`` runs. Nothing else differs from
the GPU strategy; the callback sees the same flat-parameter gradients.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model: nn.Module) -> nn.Module:
        if not any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model
