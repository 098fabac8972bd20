"""``python -m lightning_optloss.example``, kept working: the command is :mod:`lightning_optloss.demos.example`."""

from lightning_optloss.demos.example import main

if __name__ == "__main__":
    main()
