"""Hooks: layer addressing, in-memory tracing and streaming capture to HDF5."""

from .._plumbing.fingerprint import fingerprint
from .capture import capture
from .layers import layer_names, resolve_layers
from .trace import StopForward, Trace

__all__ = ["Trace", "StopForward", "capture", "fingerprint", "layer_names", "resolve_layers"]
