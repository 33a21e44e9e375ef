"""Deprecated: moved to :mod:`dissect.netdissect.label_runs` (this path is kept for one
release)."""

import warnings

from .netdissect.label_runs import *  # noqa: F403

warnings.warn("dissect.label_runs moved to dissect.netdissect.label_runs; "
              "the old path will be removed in the next release",
              DeprecationWarning, stacklevel=2)
