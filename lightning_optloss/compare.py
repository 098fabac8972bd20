"""``python -m lightning_optloss.compare``, kept working: the command is :mod:`lightning_optloss.mlflow.compare`."""

import sys

from lightning_optloss.mlflow.compare import main

if __name__ == "__main__":
    sys.exit(main())
