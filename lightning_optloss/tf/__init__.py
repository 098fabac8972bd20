"""TF1's optimizers, learning-rate schedules and ``configure_optimizers``: the optimizer half of ``optimize_loss``."""
