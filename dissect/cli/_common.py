"""Options and helpers shared by every subcommand, so they behave the same everywhere.

The argparse ``type=`` functions below turn a bad value into a usage error (one line, exit
code 2) before anything runs; the output-path checks turn a path that cannot be written into a
:class:`~dissect.errors.DissectError` (one line, exit code 1) before the work starts rather than
after it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import DissectError

MAX_COUNT = 2**31 - 1  # no count, size or index of this package is meaningful above this
MAX_SIDE = 2**16  # image sides: more than any image a network can be run on
MAX_SEED = 2**63 - 1  # what both torch and numpy generators accept
MAX_UNITS = 100_000  # units listed on the command line


# ------------------------------------------------------------------ argparse types (exit 2)

def _integer(text: str, minimum: int, maximum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not minimum <= value <= maximum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    return _integer(text, 1, MAX_COUNT, f"a positive integer (1 to {MAX_COUNT})")


def non_negative(text: str) -> int:
    """An integer >= 0 (argparse type): worker counts, class indices, optional counts."""
    return _integer(text, 0, MAX_COUNT, f"an integer from 0 to {MAX_COUNT}")


def side(text: str) -> int:
    """An image side in pixels, 1 to 65536 (argparse type)."""
    return _integer(text, 1, MAX_SIDE, f"an image side in pixels (1 to {MAX_SIDE})")


def seed(text: str) -> int:
    """A random seed, 0 to 2**63 - 1 (argparse type)."""
    return _integer(text, 0, MAX_SEED, "a seed from 0 to 2**63 - 1")


def _real(text: str, what: str, ok) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (argparse type)."""
    return _real(text, "a finite number", lambda v: True)


def positive_float(text: str) -> float:
    """A finite number > 0 (argparse type): learning rates, strengths."""
    return _real(text, "a positive number", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (argparse type): weights, noise levels."""
    return _real(text, "a number >= 0", lambda v: v >= 0)


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1 (argparse type): quantiles, shares."""
    return _real(text, "a number between 0 and 1 (both excluded)", lambda v: 0 < v < 1)


def fraction(text: str) -> float:
    """A number from 0 to 1 (argparse type): thresholds on IoU and other ratios."""
    return _real(text, "a number from 0 to 1", lambda v: 0 <= v <= 1)


def nonempty(text: str) -> str:
    """A non-empty string (argparse type): ``--data ""`` would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a value, got an empty string")
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"a value cannot hold a NUL character: {text!r}")
    return text


def path(text: str) -> Path:
    """A non-empty file or folder path (argparse type): ``""`` would silently mean ``.``."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"a path cannot hold a NUL character: {text!r}")
    return Path(text)


def names(text: str) -> list[str]:
    """A non-empty comma-separated list of names (argparse type): ``--layers``, ``--categories``."""
    result = split_list(text)
    if not result:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return result


def device(text: str) -> str:
    """A torch device string such as cpu, cuda or cuda:1 (argparse type)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps", "xpu"):  # not "meta", "lazy"...
        raise argparse.ArgumentTypeError(
            f"expected a device such as cpu, cuda or cuda:1, got {text!r}")
    if dev.type == "cuda" and dev.index is not None and torch.cuda.is_available() \
            and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"there is no {text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    backend = getattr(torch, dev.type, None) if dev.type in ("mps", "xpu") else None
    if backend is not None and not (hasattr(backend, "is_available") and backend.is_available()):
        raise argparse.ArgumentTypeError(f"device {text!r} is not available on this machine")
    return text


_device = device  # add_common's ``device`` argument shadows the name


def units(text: str) -> list[int]:
    """Parse a unit list such as ``0-15``, ``3,7,9`` or ``0-3,10`` (argparse type)."""
    result: list[int] = []
    try:
        for part in split_list(text):
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                if hi - lo + 1 + len(result) > MAX_UNITS:
                    raise argparse.ArgumentTypeError(
                        f"at most {MAX_UNITS} units at once; got {text!r}")
                result.extend(range(lo, hi + 1))
            else:
                result.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"units take a list like 0-15 or 3,7,9; got {text!r}") from None
    if not result or min(result) < 0:
        raise argparse.ArgumentTypeError(f"units must be non-negative integers; got {text!r}")
    if len(result) > MAX_UNITS or max(result) > MAX_COUNT:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_UNITS} units, each at most {MAX_COUNT}; got {text!r}")
    return result


# ------------------------------------------------------------------ shared options

def add_common(p: argparse.ArgumentParser, batch: int | None = 64, *, device: bool = True,
               workers: bool = True) -> None:
    """Add the common options a subcommand uses, and only those.

    Every subcommand gets ``--quiet`` and ``--verbose``; ``--device``, ``--batch-size`` and
    ``--num-workers`` are added only where the subcommand's ``run`` passes them on, so that
    each option listed by ``--help`` does something.

    Parameters
    ----------
    p
        The subcommand's parser.
    batch
        The default of ``--batch-size`` (``None``: the subcommand has no ``--batch-size``).
    device
        Add ``--device``.
    workers
        Add ``--num-workers`` (DataLoader worker processes).
    """
    g = p.add_argument_group("common options")
    if device:
        g.add_argument("--device", type=_device, default=None,
                       help="cpu, cuda, cuda:1 (default: cuda if present)")
    if batch is not None:
        g.add_argument("--batch-size", type=positive, default=batch,
                       help=f"samples per batch ({batch})")
    if workers:
        g.add_argument("--num-workers", type=non_negative, default=0,
                       help="DataLoader worker processes (0)")
    add_verbosity(g)


def add_verbosity(p: argparse.ArgumentParser | Any) -> None:
    """``--quiet`` and ``--verbose`` (every subcommand has both; they exclude each other)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", action="store_true",
                   help="no progress output or info messages (warnings and errors only)")
    g.add_argument("--verbose", action="store_true",
                   help="debug messages too, each prefixed with its level and logger name")


def tokens_arg(text: str) -> Any:
    """``--tokens``: ``auto``, ``none``, ``nhwc``, ``P`` or ``P:HxW`` (a ``tokens=`` value)."""
    from ..errors import DissectError
    from ..hooks.tokens import parse_tokens

    try:
        return parse_tokens(text)
    except DissectError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_tokens(p: argparse.ArgumentParser) -> None:
    """``--tokens``: how transformer token outputs become maps (the library's ``tokens=``)."""
    p.add_argument("--tokens", type=tokens_arg, default="auto", metavar="LAYOUT",
                   help="token outputs as maps: auto (torchvision/timm ViT, Swin), none (keep "
                   "outputs as they are), nhwc, P or P:HxW (P prefix tokens on an HxW patch "
                   "grid, e.g. 1:14x14) (auto)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Add the positional MODEL spec and ``--weights``."""
    p.add_argument("model", help="torchvision:NAME, mobilenet_v2-imagenet or file.py:factory")
    p.add_argument("--weights", type=nonempty, default=None,
                   help=".pth file or torchvision weights enum name")


def add_k(p: argparse.ArgumentParser, default: int, what: str) -> None:
    """``-k``/``--k`` (alias ``--top-k``): how many top images, the library's ``k=``."""
    p.add_argument("-k", "--k", "--top-k", dest="k", type=positive, default=default,
                   metavar="K", help=f"{what} ({default})")


def split_list(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (for ``--layers`` and ``--categories``)."""
    return [s.strip() for s in text.split(",") if s.strip()]


def out(text: str = "") -> None:
    """Write one line of a command's result to stdout (library code only logs)."""
    sys.stdout.write(text + "\n")


# ------------------------------------------------------------------ models and paths (exit 1)

def load_cli_model(args: argparse.Namespace):
    """``load_model(args.model, args.weights)``, with a callable transform (``None``: identity)."""
    from ..errors import ModelSpecError
    from ..models import load_model

    model, transform = load_model(args.model, args.weights)
    if transform is None:  # a factory's (module, None): images go in as they are read
        transform = _unchanged
    if not callable(transform):
        raise ModelSpecError(
            f"{args.model} gave a transform of type {type(transform).__name__}, which cannot "
            "be called on an image: return a module, or (module, callable transform)")
    return model, transform


def _unchanged(image):
    return image


def _existing_ancestor(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def check_out_folder(folder: Path, option: str = "--out") -> Path:
    """Check, before any work and without creating anything, that ``folder`` can be written.

    It must be a folder or not exist yet, under a folder that is writable.

    Raises
    ------
    DissectError
        Naming the path and what is wrong with it.
    """
    if folder.exists() and not folder.is_dir():
        raise DissectError(f"{option} {folder} is a file, not a folder: give a folder path "
                           "(it is created if missing)")
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise DissectError(f"{option} {folder} cannot be created: {base} is a file, not a folder")
    if not _writable(base):
        raise DissectError(f"{option} {folder}: {base} is not writable (permission denied)")
    return folder


def check_out_file(file: Path, option: str = "--out", example: str = "out.h5") -> Path:
    """Check, before any work and without creating anything, that ``file`` can be written."""
    if file.is_dir():
        raise DissectError(f"{option} {file} is a folder: give a file path such as "
                           f"{file / example}")
    if file.exists() and not os.access(file, os.W_OK):
        raise DissectError(f"{option} {file} is not writable (permission denied)")
    base = _existing_ancestor(file.parent)
    if not base.is_dir():
        raise DissectError(f"{option} {file} cannot be created: {base} is a file, not a folder")
    if not file.exists() and not _writable(base):
        raise DissectError(f"{option} {file}: {base} is not writable (permission denied)")
    return file


def make_out_folder(folder: Path, option: str = "--out") -> Path:
    """Create the output folder (and its parents), as one-line :class:`DissectError` on failure."""
    check_out_folder(folder, option)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DissectError(f"cannot create {option} folder {folder}: "
                           f"{exc.strerror or exc}") from exc
    return folder


def os_error_message(exc: OSError) -> str:
    """One line naming the path(s) of an operating-system error and what the system said."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    text = f"{' -> '.join(paths)}: {reason}" if paths else reason
    return one_line(text)


def one_line(text: str) -> str:
    """``text`` with its lines joined by spaces (error messages are one line)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def output_shapes(model: Any, layers: Any, x: Any, option: str, *, stop: bool = False,
                  who: str = "the model", tokens: Any = "auto") -> dict[str, tuple[int, ...]]:
    """The output shape of each traced layer for one input ``x`` (a forward pass, no graph),
    token layers as the maps analyses see (``tokens=`` as for :class:`~dissect.hooks.Trace`).

    A model that cannot take ``x`` is a :class:`~dissect.DissectError` telling which option
    (``option``, e.g. ``"--input-size"``) sets its size; layers that did not run are absent.
    """
    import torch

    from ..errors import DissectError
    from ..hooks import Trace

    try:
        with torch.inference_mode(), Trace(model, layers, stop=stop, tokens=tokens,
                                           record=lambda n, t: tuple(t.shape)) as tr:
            model(x)
    except (RuntimeError, ValueError) as exc:  # the model cannot take this input: say so
        first = next((s.strip() for s in str(exc).splitlines() if s.strip()), "")
        size = "x".join(str(s) for s in x.shape)
        raise DissectError(f"{who} failed on a {size} input ({type(exc).__name__}: {first}): "
                           f"give the input side it takes with {option}") from exc
    return dict(tr.outputs)
