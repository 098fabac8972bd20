"""Continue a TF checkpoint fixture case on two DDP processes (gloo): ``python tf_checkpoint_ddp.py CASE OUT_DIR``.

Started under ``torchrun --nproc_per_node=2`` by ``tests/test_tf_checkpoint.py``. Each process takes every
other sample of TF's batch of 8 (an explicit ``DistributedSampler(shuffle=False)``), so the averaged gradient
is TF's full-batch gradient. Writes ``weights_rank<r>.pt`` (the parameters after every step) and
``global_step_rank<r>.json``.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tf"))
from tf_checkpoint_support import CASES, CHECKPOINTS, RecordTensors, make_callback, make_dataset, make_model

from lightning_optloss import TFCheckpoint

logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore")


class HalfBatches(pl.LightningDataModule):
    def __init__(self, case: dict) -> None:
        super().__init__()
        self.dataset = make_dataset(case)
        self.half = len(case["batches"][0]["y"]) // 2

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(self.dataset, num_replicas=2, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(self.dataset, batch_size=self.half, sampler=sampler)


def main(name: str, out: Path) -> None:
    case = CASES[name]
    recorder = RecordTensors()
    callback = make_callback(case)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=len(case["steps"]),
        logger=False,
        callbacks=[callback, TFCheckpoint(CHECKPOINTS / name), recorder],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
    )
    trainer.fit(make_model(case), datamodule=HalfBatches(case))
    rank = trainer.global_rank
    torch.save(recorder.steps, out / f"weights_rank{rank}.pt")
    (out / f"global_step_rank{rank}.json").write_text(json.dumps(callback.global_step))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
