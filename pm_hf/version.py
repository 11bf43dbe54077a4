"""The version of pm_hf, in one place: `pm_hf.__version__`, the installed package's (pyproject.toml reads it) and the
run record's `pm_hf`."""

__version__ = "0.5.0"
