"""Non-finite activations (NaN, ``+inf``, ``-inf``): count them, say where, warn once.

A NaN or an infinity in a layer's activations is the kind of defect that turns a result
silently wrong (one NaN patch once made every Network Dissection threshold NaN). The analyses
do not guess around it quietly: Network Dissection's thresholds are quantiles of the finite
values and a non-finite value is never active, and whoever reads or writes activations reports
them, once per layer, with :class:`NonFiniteTally`::

    tally = NonFiniteTally("layer4")
    for first_row, batch in batches:  # (B, C[, H, W]) values of store rows first_row, ...
        tally.add(batch, first_row)
    tally.warn()  # at most one warning, on the "dissect" logger

which logs, when there was anything to report::

    layer 'layer4': 32 non-finite activation values (NaN 32) in rows 3, 17: thresholds are
    quantiles of the finite values and non-finite values are never active

:func:`nonfinite_summary` does the same for values at hand in one call. Checking costs one
sum over the values (a NaN or an infinity makes it non-finite); only then are they examined
value by value, so a tally costs next to nothing on finite data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

MAX_ROWS = 5  # affected rows named in a summary
LOGGER = "dissect"  # where :meth:`NonFiniteTally.warn` logs by default

_CONSEQUENCE = ("thresholds are quantiles of the finite values and non-finite values are never "
                "active")


def _listing(items: Sequence[int], total: int) -> str:
    """``"3, 17"``, or ``"3, 17, 20, 21, 22 and 7 more"`` when ``total`` exceeds the items."""
    shown = ", ".join(str(int(i)) for i in items)
    return shown + (f" and {total - len(items)} more" if total > len(items) else "")


@dataclass(frozen=True)
class NonFiniteSummary:
    """The non-finite values of one layer's activations.

    Attributes
    ----------
    layer
        The layer's name.
    total
        Number of non-finite values (``nan + posinf + neginf``).
    nan, posinf, neginf
        How many are NaN, ``+inf``, ``-inf``.
    values
        Number of values examined.
    rows
        The first affected store rows (ascending, at most :data:`MAX_ROWS`).
    n_rows
        Number of rows holding at least one non-finite value.
    empty_units
        The first units (axis 1 of the values, ascending, at most :data:`MAX_ROWS`) that have
        no finite value at all among the values examined; empty for values without a unit axis.
    n_empty_units
        Number of such units.
    """

    layer: str
    total: int
    nan: int
    posinf: int
    neginf: int
    values: int
    rows: tuple[int, ...]
    n_rows: int
    empty_units: tuple[int, ...] = ()
    n_empty_units: int = 0

    def __bool__(self) -> bool:
        """True when there is something to report (any non-finite value)."""
        return self.total > 0

    def message(self) -> str:
        """The warning's text, e.g. ``"layer 'x': 32 non-finite activation values (NaN 32) in
        rows 3, 17: thresholds are quantiles of the finite values and non-finite values are
        never active"``; units without any finite value are named after it."""
        split = ", ".join(f"{name} {count}" for name, count in
                          (("NaN", self.nan), ("+inf", self.posinf), ("-inf", self.neginf))
                          if count)
        word = "row" if self.n_rows == 1 else "rows"
        text = (f"layer {self.layer!r}: {self.total} non-finite activation "
                f"value{'s' if self.total != 1 else ''} ({split}) in {word} "
                f"{_listing(self.rows, self.n_rows)}: {_CONSEQUENCE}")
        if self.n_empty_units:
            one = self.n_empty_units == 1
            text += (f"; unit{'' if one else 's'} "
                     f"{_listing(self.empty_units, self.n_empty_units)} "
                     f"{'has' if one else 'have'} no finite value at all (threshold +inf: never "
                     "active, never a detector)")
        return text


class NonFiniteTally:
    """A running count of one layer's non-finite activations, added batch by batch.

    Has the running-statistics shape of :mod:`dissect.stats`: :meth:`add`, :meth:`merge`,
    :meth:`summary`, :meth:`state_dict` / :meth:`load_state_dict` (small: counts, a few rows,
    one count per unit), so the tallies of several processes can be gathered and merged.

    Parameters
    ----------
    layer
        The layer's name (it names the layer in the warning).
    """

    def __init__(self, layer: str) -> None:
        self.layer = layer
        self.nan = self.posinf = self.neginf = 0
        self.values = 0  # values examined
        self.seen_rows = 0  # rows examined
        self.rows: list[int] = []  # first affected rows, ascending, at most MAX_ROWS
        self.n_rows = 0  # affected rows
        self.unit_bad: np.ndarray | None = None  # (C,) non-finite values per unit
        self.unit_values: np.ndarray | None = None  # (C,) values examined per unit

    @property
    def total(self) -> int:
        """Number of non-finite values so far."""
        return self.nan + self.posinf + self.neginf

    def add(self, values: torch.Tensor | np.ndarray,
            first_row: int | Sequence[int] | np.ndarray = 0) -> int:
        """Count the non-finite values of one batch.

        Parameters
        ----------
        values
            ``(B, ...)`` values of ``B`` rows (torch tensor on any device, or numpy array);
            axis 1, when there is one, is the unit axis (``(B, C)`` or ``(B, C, H, W)``).
        first_row
            The store row of ``values[0]`` (the rows are consecutive), or the store row of
            each ``values[i]`` (``B`` ints).

        Returns
        -------
        int
            The number of non-finite values in this batch (0 on finite data, found with one
            sum over the values).
        """
        if isinstance(values, np.ndarray):
            values = np.ascontiguousarray(values)  # torch cannot view negative strides
        t = torch.as_tensor(values)
        if t.ndim == 0:
            t = t.reshape(1)
        b = t.shape[0]
        self.values += t.numel()
        self.seen_rows += b
        units = t.shape[1] if t.ndim >= 2 else 0
        if self.seen_rows == b:  # the first batch: count per unit (when it has units)
            self.unit_values = np.zeros(units, dtype=np.int64) if units else None
            self.unit_bad = np.zeros(units, dtype=np.int64) if units else None
        elif self.unit_values is not None and len(self.unit_values) != units:
            self.unit_values = self.unit_bad = None  # batches disagree: no per-unit counts
        if self.unit_values is not None:
            self.unit_values += t.numel() // units
        if t.numel() == 0 or not t.is_floating_point():
            return 0
        acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
        if bool(torch.isfinite(t.sum(dtype=acc))):  # a NaN or an infinity makes it non-finite
            return 0
        nan = torch.isnan(t)
        pos = t == torch.inf
        neg = t == -torch.inf
        bad = nan | pos | neg
        n_nan, n_pos, n_neg = (int(m.sum()) for m in (nan, pos, neg))
        count = n_nan + n_pos + n_neg
        if count == 0:  # a finite sum that overflowed
            return 0
        self.nan += n_nan
        self.posinf += n_pos
        self.neginf += n_neg
        hit = torch.nonzero(bad.reshape(b, -1).any(dim=1)).squeeze(1).cpu().numpy()
        if isinstance(first_row, (int, np.integer)):
            hit_rows = hit + int(first_row)
        else:
            hit_rows = np.asarray(first_row, dtype=np.int64)[hit]
        self.n_rows += len(hit_rows)
        self.rows = sorted({*self.rows,
                            *(int(r) for r in np.sort(hit_rows)[:MAX_ROWS])})[:MAX_ROWS]
        if self.unit_bad is not None:
            self.unit_bad += bad.transpose(0, 1).reshape(units, -1).sum(dim=1).cpu().numpy()
        return count

    def add_finite(self, rows: int, units: int = 0, per_unit: int = 1) -> None:
        """Count ``rows`` rows known to hold only finite values without looking at them.

        For a caller whose own check already found those rows finite (e.g.
        :func:`dissect.stats.exact_quantiles`, which calls back only with the batches holding a
        non-finite value): the totals, and so the units found to have no finite value, then
        cover every row.

        Parameters
        ----------
        rows
            Number of rows.
        units
            Their unit axis' length (``0``: no unit axis).
        per_unit
            Values per row and unit (``h * w`` for maps).
        """
        if rows <= 0:
            return
        first = self.seen_rows == 0
        self.seen_rows += rows
        self.values += rows * max(units, 1) * per_unit
        if first:
            self.unit_values = np.zeros(units, dtype=np.int64) if units else None
            self.unit_bad = np.zeros(units, dtype=np.int64) if units else None
        elif self.unit_values is not None and len(self.unit_values) != units:
            self.unit_values = self.unit_bad = None
        if self.unit_values is not None:
            self.unit_values += rows * per_unit

    def merge(self, other: NonFiniteTally) -> None:
        """Fold in the tally of other rows of the same layer (e.g. another process's shard)."""
        self.load_state_dict(_merged(self.state_dict(), other.state_dict()))

    def summary(self) -> NonFiniteSummary:
        """What was counted so far."""
        empty: np.ndarray = np.zeros(0, dtype=np.int64)
        if self.unit_bad is not None and self.unit_values is not None:
            empty = np.flatnonzero((self.unit_bad == self.unit_values) & (self.unit_values > 0))
        return NonFiniteSummary(self.layer, self.total, self.nan, self.posinf, self.neginf,
                                self.values, tuple(self.rows), self.n_rows,
                                tuple(int(u) for u in empty[:MAX_ROWS]), len(empty))

    def warn(self, log: logging.Logger | None = None) -> NonFiniteSummary | None:
        """Log one warning when any value was non-finite (see :meth:`NonFiniteSummary.message`).

        Parameters
        ----------
        log
            The logger (default: the ``"dissect"`` logger).

        Returns
        -------
        NonFiniteSummary or None
            The summary when a warning was logged, else ``None``.
        """
        summary = self.summary()
        if not summary:
            return None
        (log or logging.getLogger(LOGGER)).warning("%s", summary.message())
        return summary

    def state_dict(self) -> dict[str, Any]:
        """The counts (plain ints, lists and int64 arrays: small and picklable)."""
        return {"layer": self.layer, "nan": self.nan, "posinf": self.posinf,
                "neginf": self.neginf, "values": self.values, "seen_rows": self.seen_rows,
                "rows": list(self.rows), "n_rows": self.n_rows,
                "unit_bad": None if self.unit_bad is None else self.unit_bad.copy(),
                "unit_values": None if self.unit_values is None else self.unit_values.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts saved by :meth:`state_dict`."""
        self.layer = state["layer"]
        self.nan, self.posinf, self.neginf = (int(state[k]) for k in ("nan", "posinf", "neginf"))
        self.values, self.seen_rows = int(state["values"]), int(state["seen_rows"])
        self.rows, self.n_rows = [int(r) for r in state["rows"]], int(state["n_rows"])
        self.unit_bad = None if state["unit_bad"] is None else np.array(state["unit_bad"])
        self.unit_values = None if state["unit_values"] is None else np.array(
            state["unit_values"])


def _merged(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two :meth:`NonFiniteTally.state_dict` states of disjoint rows of one layer, summed."""
    out = dict(a)
    for key in ("nan", "posinf", "neginf", "values", "seen_rows", "n_rows"):
        out[key] = a[key] + b[key]
    out["rows"] = sorted({*a["rows"], *b["rows"]})[:MAX_ROWS]
    for key in ("unit_bad", "unit_values"):
        if a[key] is None or b[key] is None or len(a[key]) != len(b[key]):
            out[key] = a[key] if b[key] is None else b[key] if a[key] is None else None
        else:
            out[key] = a[key] + b[key]
    return out


def merged_tallies(states: Sequence[dict[str, Any]]) -> NonFiniteTally:
    """One tally from the :meth:`NonFiniteTally.state_dict` states of several processes
    (e.g. what :meth:`dissect.distributed.DistContext.gather` returns)."""
    tally = NonFiniteTally(states[0]["layer"])
    state = states[0]
    for other in states[1:]:
        state = _merged(state, other)
    tally.load_state_dict(state)
    return tally


def nonfinite_summary(layer: str, values: torch.Tensor | np.ndarray,
                      rows: int | Sequence[int] | np.ndarray = 0) -> NonFiniteSummary:
    """The non-finite values of ``values`` in one call (see :class:`NonFiniteTally`).

    Parameters
    ----------
    layer
        The layer's name.
    values
        ``(B, ...)`` values; axis 1, when there is one, is the unit axis.
    rows
        The store row of ``values[0]`` (consecutive rows), or of each ``values[i]``.

    Returns
    -------
    NonFiniteSummary
        Falsy when every value is finite; :meth:`NonFiniteSummary.message` is the warning.
    """
    tally = NonFiniteTally(layer)
    tally.add(values, rows)
    return tally.summary()
