"""``python -m lightning_optloss.tf_checkpoint inspect PATH [--module pkg.Module]``: see
:mod:`lightning_optloss.tf.checkpoint_inspect`."""

import sys

from lightning_optloss.tf.checkpoint_inspect import main

if __name__ == "__main__":
    sys.exit(main())
