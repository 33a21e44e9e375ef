"""Deprecated: moved to :mod:`dissect.netdissect.numba_engine` (this path is kept for one
release)."""

import warnings

from .netdissect.numba_engine import *  # noqa: F403

warnings.warn("dissect.fused_tally moved to dissect.netdissect.numba_engine; "
              "the old path will be removed in the next release",
              DeprecationWarning, stacklevel=2)
