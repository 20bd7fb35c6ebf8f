"""The package version, in one place (read by the package root and by checkpoint metadata)."""

__version__ = "0.2.0"
