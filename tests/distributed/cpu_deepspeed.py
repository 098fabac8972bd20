"""DeepSpeed (Lightning's ``DeepSpeedStrategy``) on CPU processes with gloo, for the tests only.

DeepSpeed itself runs ZeRO 1, 2 and 3 on its CPU accelerator; Lightning's strategy refuses any accelerator but
CUDA in ``setup_environment`` and hands DeepSpeed ``root_device.index``, which is None for a plain CPU device.
The three overrides below remove those two obstacles and nothing else: the callback sees what it sees on GPUs.
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own checks for a CUDAAccelerator first

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)  # DeepSpeed requires a device index

    def setup_distributed(self) -> None:
        # DeepSpeedStrategy.setup_distributed without the check of a (CUDA) device index.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()
