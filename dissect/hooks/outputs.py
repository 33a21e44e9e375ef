"""Layer outputs as rows of samples: what capture stores for each layer, checked.

A store holds one row per sample, so a layer's output must be ``(N, ...)`` with ``N`` the
batch size. Two kinds of modules do not return that:

- **sequence-first modules** return ``(T, N, ...)``: ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``
  with ``batch_first=False`` (their default), ``nn.MultiheadAttention``,
  ``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer`` and ``nn.Transformer`` with
  ``batch_first=False``, and ``nn.TransformerEncoder``/``nn.TransformerDecoder`` whose layers
  are. Their outputs are transposed to ``(N, T, ...)`` before they are stored;
- anything else whose first dimension is not the batch size (a flattened output, a pooled
  statistic, a scalar) is refused with a :class:`~dissect.DataError` naming the layer: storing
  it as rows would mix up samples without a word.

Complex outputs are refused (the store holds real values), and integer outputs beyond what the
stored float type holds exactly too.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DataError

EXACT_INTS = {torch.float16: 2 ** 11, torch.float32: 2 ** 24}


def sequence_first(module: nn.Module) -> bool:
    """Whether ``module`` returns its output sequence-first, ``(T, N, ...)``."""
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention, nn.Transformer)):
        return not module.batch_first
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first  # the layer keeps the flag on its attention
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return len(module.layers) > 0 and sequence_first(module.layers[0])
    return False


def as_rows(name: str, t: torch.Tensor, batch: int, seq_first: bool,
            stored: torch.dtype) -> torch.Tensor:
    """Layer ``name``'s output as ``(batch, ...)`` rows (see the module docstring).

    Parameters
    ----------
    name
        The layer, for messages.
    t
        Its output for one batch.
    batch
        The number of samples in the batch.
    seq_first
        The layer is sequence-first (:func:`sequence_first`): transpose its first two axes.
    stored
        The dtype rows are stored in.

    Raises
    ------
    DataError
        For a scalar, an output whose first dimension is not the batch size, complex values,
        or integers the stored dtype cannot hold exactly.
    """
    if t.ndim == 0:
        raise DataError(f"layer {name!r} returned a scalar, not one row per sample: capture a "
                        "layer whose output is (N, ...)")
    if seq_first:
        if t.ndim < 2 or t.shape[1] != batch:
            raise DataError(f"layer {name!r} is sequence-first but returned {tuple(t.shape)} "
                            f"for a batch of {batch}: expected (T, {batch}, ...)")
        t = t.transpose(0, 1)
    elif t.shape[0] != batch:
        raise DataError(
            f"layer {name!r} returned shape {tuple(t.shape)} for a batch of {batch}: its first "
            "dimension is not the batch size, so its rows are not samples (a flattened or "
            "sequence-first output?). Capture a layer whose output is (N, ...), or build the "
            "module with batch_first=True")
    if t.is_complex():
        raise DataError(f"layer {name!r} returns complex values, which a store cannot hold: "
                        "capture a layer with real outputs (or their magnitude)")
    if not t.is_floating_point() and t.numel():
        limit = EXACT_INTS.get(stored, 2 ** 24)
        if t.dtype != torch.bool and int(t.abs().max()) > limit:
            raise DataError(f"layer {name!r} returns integers up to {int(t.abs().max())}, more "
                            f"than {stored} holds exactly ({limit}): capture with "
                            "dtype='float32', or a layer with float outputs")
    return t
