"""Deprecated: moved to :mod:`dissect.netdissect.active_pixels` (this path is kept for one
release)."""

import warnings

from .netdissect.active_pixels import *  # noqa: F403

warnings.warn("dissect.active_pixels moved to dissect.netdissect.active_pixels; "
              "the old path will be removed in the next release",
              DeprecationWarning, stacklevel=2)
