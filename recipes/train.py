"""The recipes' entry point, a LightningCLI: ``python -m recipes.train fit --config recipes/ddp.yaml``.

Every option of the YAML can be overridden on the command line (``--trainer.devices=8``,
``--trainer.callbacks.init_args.clip_gradients=0.5`` ...); ``--print_config`` shows the resolved one. The
resolved configuration is stored with the run, as the MLflow artifact ``config.yaml``.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger


class LogConfigToMLflow(SaveConfigCallback):
    """Stores the resolved CLI configuration as the run's ``config.yaml`` artifact (rank 0, at the start).

    Lightning's default writes it to ``trainer.log_dir``, which an MLflow logger on a database store lacks.
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_text(logger.run_id, config, self.config_filename)


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        save_config_callback=LogConfigToMLflow, save_config_kwargs={"save_to_log_dir": False}, args=args
    )


if __name__ == "__main__":
    main()
