"""``python -m lightning_optloss.demo``, kept working: the command is :mod:`lightning_optloss.demos.demo`."""

from lightning_optloss.demos.demo import main


def console_main() -> None:
    """The ``optloss-demo`` console command: runs the demo and exits with status 0 (``main`` returns its results)."""
    main()


if __name__ == "__main__":
    main()
