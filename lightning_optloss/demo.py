"""``python -m lightning_optloss.demo``, kept working: the command is :mod:`lightning_optloss.demos.demo`."""

from lightning_optloss.demos.demo import main

if __name__ == "__main__":
    main()
