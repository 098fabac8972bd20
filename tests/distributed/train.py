"""One training run for the multi-process tests: ``python train.py CONFIG_JSON OUT_DIR``.

Started by the tests as a plain process (one device, or ``ddp_spawn``) or under ``torchrun`` (``ddp``,
``fsdp2``), with the same model, data and OptimizeLoss configuration; it writes what the tests compare:
``weights_rank<r>.pt`` (full parameters after training, every rank), ``state_rank<r>.pt`` (the callback's
state), ``metrics.json`` (every metric of the run, read back from its sqlite MLflow store, rank 0) and,
when asked, a checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cpu_fsdp import CPUFSDPStrategy
from support import LossScaledAt, TinyRegression, metric_values, regression_data

from lightning_optloss import (
    OptimizeLoss,
    adaptive_clipping_fn,
    agc_clipping_fn,
    annealed_noise_scale,
    autoclip_fn,
    spike_skipping_fn,
)
from lightning_optloss.tf import decay

logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore")
warnings.filterwarnings("default", message="OptimizeLoss")  # the tests read what OptimizeLoss says


class Sharded(pl.LightningModule):
    """A module whose parameters FSDP2 shards over the data-parallel mesh."""

    def configure_model(self) -> None:
        fully_shard(self, mesh=self.device_mesh["data_parallel"])


class ShardedRegression(Sharded, TinyRegression):
    """TinyRegression, sharded by FSDP2."""


class ShardedLossScaledAt(Sharded, LossScaledAt):
    """LossScaledAt, sharded by FSDP2."""


def clip_from(spec: Any) -> Any:
    if spec == "adaptive":
        return adaptive_clipping_fn(global_step=True, report_summary=True)
    if spec == "agc":
        return agc_clipping_fn(clip_factor=0.05, exclude="b2")
    if spec == "autoclip":
        return autoclip_fn(percentile=50, history=8)
    return spec  # None, a float, or {glob: value}


def decay_from(spec: str | None) -> Any:
    if spec == "exponential":
        return functools.partial(decay.exponential_decay, decay_steps=3, decay_rate=0.5)
    if spec == "warmup_cosine":
        return functools.partial(decay.warmup_cosine_decay, warmup_steps=2, decay_steps=6)
    return None


class RegressionData(pl.LightningDataModule):
    """The fixed regression batches; with two processes each takes every other sample of a global batch."""

    def __init__(self, batches: int, global_batch: int, devices: int) -> None:
        super().__init__()
        self.dataset = regression_data(batches, batch_size=global_batch).dataset
        self.global_batch = global_batch
        self.devices = devices

    def train_dataloader(self) -> DataLoader:
        if self.devices == 1:
            return DataLoader(self.dataset, batch_size=self.global_batch, shuffle=False)
        # Built in the worker (ddp_spawn), so the rank is the worker's own.
        sampler = DistributedSampler(self.dataset, num_replicas=2, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(self.dataset, batch_size=self.global_batch // 2, sampler=sampler)


class SaveResults(pl.Callback):
    """Writes every rank's full weights and OptimizeLoss state, and rank 0's metrics, at the end of fit."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank = trainer.global_rank
        if isinstance(trainer.strategy, FSDPStrategy):
            with FullyShardedDataParallel.summon_full_params(trainer.model, writeback=False):
                weights = {name: param.detach().clone() for name, param in pl_module.named_parameters()}
        elif isinstance(trainer.strategy, DeepSpeedStrategy):
            import deepspeed

            # Whole parameters under ZeRO-3; a no-op for stages 1 and 2.
            with deepspeed.zero.GatheredParameters(list(pl_module.parameters())):
                weights = {name: param.detach().clone() for name, param in pl_module.named_parameters()}
        else:
            weights = {
                name: (param.full_tensor() if isinstance(param, DTensor) else param).detach().clone()
                for name, param in pl_module.named_parameters()
            }
        torch.save(weights, self.out / f"weights_rank{rank}.pt")
        optimize_loss = next(c for c in trainer.callbacks if isinstance(c, OptimizeLoss))  # the worker's copy
        torch.save(optimize_loss.state_dict(), self.out / f"state_rank{rank}.pt")
        if rank == 0:
            (self.out / "metrics.json").write_text(json.dumps(metric_values(trainer.logger)))
            # OptimizeLoss, before this callback in the list, has uploaded its histograms in its on_fit_end.
            logger = trainer.logger
            logger.experiment.download_artifacts(logger.run_id, "optimize_loss/histograms", str(self.out))


def main(config: dict[str, Any], out: Path) -> None:
    strategy = config["strategy"]
    devices = 1 if strategy == "single" else 2
    noise = config.get("noise")
    callback = OptimizeLoss(
        gradient_noise_scale=annealed_noise_scale(eta=0.05) if noise == "annealed" else noise,
        gradient_multipliers=config.get("multipliers"),
        clip_gradients=clip_from(config.get("clip")),
        summaries=["loss", "learning_rate", "gradients", "gradient_norm", "global_gradient_norm"],
        seed=config.get("seed", 7),
        skip_spikes=spike_skipping_fn(**config["skip_spikes"]) if config.get("skip_spikes") else None,
    )
    options = {
        "optimizer": config.get("optimizer", "Adam"),
        "learning_rate": 0.05,
        "decay_fn": decay_from(config.get("decay")),
    }
    if config.get("loss_factor"):  # every batch's loss multiplied by it
        model = LossScaledAt(set(range(256)), config["loss_factor"], **options)
    elif config.get("spike_batches"):  # these batches' losses times 1e3 (corrupt batches)
        model = (ShardedLossScaledAt if strategy == "fsdp2" else LossScaledAt)(
            set(config["spike_batches"]), 1e3, **options
        )
    else:
        model = (ShardedRegression if strategy == "fsdp2" else TinyRegression)(**options)
    callbacks: list[pl.Callback] = [callback, SaveResults(out)]
    if config.get("checkpoint_every"):
        callbacks.append(ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_train_steps=config["checkpoint_every"]))
    strategies = {
        "single": "auto",
        "fsdp2": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        "fsdp1": CPUFSDPStrategy(process_group_backend="gloo"),
    }
    if strategy.startswith("deepspeed"):  # deepspeed1, deepspeed2, deepspeed3: the ZeRO stage
        from cpu_deepspeed import CPUDeepSpeedStrategy

        strategies[strategy] = CPUDeepSpeedStrategy(stage=int(strategy[-1]), process_group_backend="gloo")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategies.get(strategy, strategy),
        max_steps=config["steps"],
        logger=MLFlowLogger(experiment_name="distributed", tracking_uri=f"sqlite:///{out / 'mlflow.db'}"),
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(config.get("checkpoint_every")),
        use_distributed_sampler=False,
        accumulate_grad_batches=config.get("accumulate", 1),
    )
    data = RegressionData(config.get("batches_per_epoch", config["steps"]), config["global_batch"], devices)
    trainer.fit(model, datamodule=data, ckpt_path=config.get("resume_from"))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), Path(sys.argv[2]))
