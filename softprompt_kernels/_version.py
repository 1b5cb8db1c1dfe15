"""The one version string of softprompt-kernels (pyproject.toml reads it from here)."""
__version__ = "0.2.0"
