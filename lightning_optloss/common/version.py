"""The package's version, kept equal to ``pyproject.toml``'s; here so that any layer can read it."""

__version__ = "0.1.0"
