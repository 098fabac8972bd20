"""The model and data the recipes train: the demo's digits classifier, ready for DDP and FSDP2.

scikit-learn's bundled 8x8 digits need no download, so a recipe runs anywhere; swap in your own
``LightningModule`` and ``LightningDataModule`` (``model.class_path`` / ``data.class_path`` in the YAML).
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader

from lightning_optloss.demos.demo import DigitsClassifier, digits_split


class DigitsModel(DigitsClassifier):
    """The demo's CNN; under ``ModelParallelStrategy`` every layer with parameters is sharded by FSDP2."""

    def configure_model(self) -> None:
        mesh = getattr(self, "_device_mesh", None)  # set by ModelParallelStrategy only
        if mesh is None:
            return
        data_parallel = mesh["data_parallel"]
        for module in [*self.features, *self.classifier]:
            if any(True for _ in module.parameters(recurse=False)):
                fully_shard(module, mesh=data_parallel)
        fully_shard(self, mesh=data_parallel)


class DigitsDataModule(LightningDataModule):
    """scikit-learn's digits: 80 % training (shuffled; Lightning adds the distributed sampler), 20 % validation.

    Args:
        batch_size: Samples per process and step (the global batch is ``batch_size * world size``).
        seed: Seed of the train/validation split.
    """

    def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str) -> None:
        self.train_set, self.val_set = digits_split(self.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)
