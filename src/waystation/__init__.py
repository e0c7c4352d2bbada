"""Waystation: a control plane for provisioning jobs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("waystation")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
