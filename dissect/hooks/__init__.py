"""Hooks: layer addressing, in-memory tracing and streaming capture to HDF5."""

from .._plumbing.fingerprint import fingerprint
from .capture import capture
from .layers import layer_names, resolve_layers
from .select import first_tensor, select_output
from .tokens import TokenGrid, resolve_tokens, token_layout
from .trace import StopForward, Trace, trace

__all__ = ["Trace", "StopForward", "TokenGrid", "capture", "first_tensor", "fingerprint",
           "layer_names", "resolve_layers", "resolve_tokens", "select_output", "token_layout",
           "trace"]
