"""A short real training that shows OptimizeLoss end to end: ``python -m lightning_optloss.demo``.

A small convolutional network learns scikit-learn's bundled 8x8 digits (no download) with TF's Adam,
exponential learning-rate decay, global-norm clipping, gradient noise and all five TF summaries, logged to
an embedded sqlite MLflow store, with gradient pictures in MLflow's image grid every 100 steps. 20 epochs (900
steps, the learning rate halved every 300): the loss falls through most of them instead of sitting at the
noise floor. At the end it prints the accuracy, the ``mlflow ui`` command that shows the run, and where to see
four runs side by side (the example store ``mlruns_example/`` and the compare command). ``make demo`` runs it.

Flags show the tools that came after TF: ``--clip adaptive|agc|autoclip|"features.*=1.0,classifier.*=0.5"``
(TF's adaptive clipping, unit-wise AGC, AutoClip, per-group clipping), ``--noise annealed`` (Neelakantan et
al.'s annealed noise) and ``--warmup 200`` (linear warmup before the decay).
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_optloss import (
    OPTIMIZER_SUMMARIES,
    MLFlowLogger,
    OptimizeLoss,
    adaptive_clipping_fn,
    agc_clipping_fn,
    annealed_noise_scale,
    autoclip_fn,
    configure_optimizers,
)
from lightning_optloss.demos.example_store import DATABASE, EXPERIMENT, RUN_NAMES, ui_command
from lightning_optloss.tf import decay


class DigitsClassifier(pl.LightningModule):
    """Two convolutions and a linear layer over 8x8 grey images, ten classes."""

    def __init__(
        self, learning_rate: float = 0.003, decay_steps: int = 300, decay_rate: float = 0.5, warmup_steps: int = 0
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))
        self.train_accuracy = MulticlassAccuracy(num_classes=10)
        self.val_accuracy = MulticlassAccuracy(num_classes=10)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.features(images))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        self.train_accuracy(logits, labels)
        self.log("train_accuracy", self.train_accuracy, on_step=False, on_epoch=True)
        return nn.functional.cross_entropy(logits, labels)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_accuracy(logits, labels)
        self.log("val_loss", nn.functional.cross_entropy(logits, labels), sync_dist=True)
        self.log("val_accuracy", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self) -> Any:
        schedule = functools.partial(
            decay.exponential_decay, decay_steps=self.hparams.decay_steps, decay_rate=self.hparams.decay_rate
        )
        if self.hparams.warmup_steps:
            schedule = decay.linear_warmup(schedule, self.hparams.warmup_steps)
        return configure_optimizers(self, "Adam", self.hparams.learning_rate, schedule)


def digits_split(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits (1797 8x8 images in [0, 1]), 80 % for training and 20 % for validation, split by
    a permutation seeded with ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise SystemExit("The demo needs scikit-learn: pip install 'lightning-optloss[demo]'") from error

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(labels))
    train, val = order[:split], order[split:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


def digits_loaders(batch_size: int = 32, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """The :func:`digits_split` as loaders: training shuffled in ``batch_size`` batches, validation in 256."""
    train_set, val_set = digits_split(seed)
    return DataLoader(train_set, batch_size=batch_size, shuffle=True), DataLoader(val_set, batch_size=256)


def clip_from(text: str) -> Any:
    """``--clip``: a number (0: off), ``adaptive``, ``agc``, ``autoclip``, or ``glob=value,...`` per group."""
    tools = {
        "adaptive": lambda: adaptive_clipping_fn(global_step=True, report_summary=True),
        "agc": lambda: agc_clipping_fn(clip_factor=0.02, exclude="classifier.3.*"),  # the paper spares the head
        "autoclip": lambda: autoclip_fn(percentile=10),
    }
    if text in tools:
        return tools[text]()
    if "=" in text:
        groups = dict(item.split("=", 1) for item in text.split(","))
        return {glob.strip(): float(value) for glob, value in groups.items()}
    return float(text) or None


def noise_from(text: str) -> Any:
    """``--noise``: a scale (0: off) or ``annealed`` (sigma_t^2 = 0.01 / (1 + t)^0.55)."""
    return annealed_noise_scale(eta=0.01) if text == "annealed" else (float(text) or None)


def run(
    store: Path,
    epochs: int,
    clip: str,
    noise: str,
    log_every_n_steps: int,
    seed: int = 0,
    warmup: int = 0,
) -> dict[str, Any]:
    """Train, log to the sqlite store in ``store``; return the run id, accuracy, steps and seconds."""
    pl.seed_everything(seed, verbose=False)
    store.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{(store / 'mlflow.db').resolve()}"
    logger = MLFlowLogger(
        experiment_name="lightning_optloss-demo",
        tracking_uri=tracking_uri,
        artifact_location=(store / "artifacts").resolve().as_uri(),
        run_name=f"adam-decay-clip{clip}-noise{noise}" + (f"-warmup{warmup}" if warmup else ""),
    )
    optimize_loss = OptimizeLoss(
        gradient_noise_scale=noise_from(noise),
        clip_gradients=clip_from(clip),
        summaries=OPTIMIZER_SUMMARIES,
        seed=seed,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=[optimize_loss],
        log_every_n_steps=log_every_n_steps,
        enable_checkpointing=False,
        enable_model_summary=False,
        deterministic=True,
    )
    train_loader, val_loader = digits_loaders(seed=seed)
    started = time.perf_counter()
    trainer.fit(DigitsClassifier(warmup_steps=warmup), train_loader, val_loader)
    return {
        "run_id": logger.run_id,
        "tracking_uri": tracking_uri,
        "val_accuracy": float(trainer.callback_metrics["val_accuracy"]),
        "global_step": optimize_loss.global_step,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m lightning_optloss.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("demo_mlruns"), help="folder of the sqlite store")
    parser.add_argument("--epochs", type=int, default=20, help="45 steps, about 0.4 s, each on a laptop CPU")
    parser.add_argument("--clip", default="1.0", help=clip_from.__doc__.split(": ", 1)[1])
    parser.add_argument("--noise", default="0.001", help=noise_from.__doc__.split(": ", 1)[1])
    parser.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warmup (0: none)")
    parser.add_argument("--log-every-n-steps", type=int, default=10)
    args = parser.parse_args(argv)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    result = run(args.store, args.epochs, args.clip, args.noise, args.log_every_n_steps, warmup=args.warmup)
    print(
        f"\nTrained {result['global_step']} steps in {result['seconds']:.0f} s; "
        f"validation accuracy {result['val_accuracy']:.3f}.\n"
        f"MLflow run {result['run_id']} is in {args.store}/. Open it with:\n\n"
        f"    .venv/bin/mlflow ui --backend-store-uri {result['tracking_uri']}\n\n"
        "then browse http://127.0.0.1:5000 (experiment 'lightning_optloss-demo': metrics 'OptimizeLoss/...', "
        "the gradient pictures with their step slider in the Chart view).\n\n"
        f"Four runs side by side (no clipping, clip 1.0, adaptive clipping, noise) are in the example store:\n\n"
        f"    .venv/bin/{ui_command()}\n\n"
        "and in one picture:\n\n"
        f"    .venv/bin/python -m lightning_optloss.compare {' '.join(RUN_NAMES)} --experiment {EXPERIMENT} "
        f"--tracking-uri sqlite:///mlruns_example/{DATABASE} --output compare.png\n"
    )
    return result


if __name__ == "__main__":
    main()
