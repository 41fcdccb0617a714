"""The package version, recorded in every checkpoint otfuse writes."""

__version__ = "0.2.0"
