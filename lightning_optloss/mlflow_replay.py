"""``python -m lightning_optloss.mlflow_replay`` still works: the command is :mod:`lightning_optloss.mlflow.replay`."""

import sys

from lightning_optloss.mlflow.replay import main

if __name__ == "__main__":
    sys.exit(main())
