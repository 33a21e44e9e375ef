"""The ``dissect`` command: argparse subcommands that wire the library together.

No analysis logic lives here. Each subcommand is a module of this package with
``HELP``, ``add_parser(sub)`` and ``run(args)``; ``COMMANDS`` lists them in the
order ``dissect --help`` shows. A library error (:class:`~dissect.errors.DissectError`)
becomes one line on stderr and exit code 1, and so does an :class:`OSError` (a path that
cannot be read or written: the line names it); a usage error is argparse's one line and exit
code 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from ..errors import DissectError
from ._common import one_line, os_error_message

COMMANDS = (
    "layers", "capture", "netdissect", "explain", "ablate", "probe", "similarity", "attribute",
    "deconv", "actmax", "invert", "report", "compare", "data", "demo",
)

EPILOG = """examples:
  dissect layers mobilenet_v2-imagenet --input-size 224
  dissect capture mobilenet_v2-imagenet --data samples --layers features.6,features.13 \\
      --out acts.h5 --pool mean
  dissect capture torchvision:resnet18 --weights r18.pth --data ./images --layers layer4 \\
      --out r18.h5 --device cuda
  dissect netdissect torchvision:resnet18 --weights r18.pth --dataset broden:broden1_224 \\
      --layers layer3,layer4 --out r18-dissect --device cuda
  dissect explain r18-dissect/activations.h5 --layers layer4   # formulas: (red AND circle)
  dissect ablate torchvision:resnet18 --weights r18.pth --data ./images --layer layer4 \\
      --out r18-dissect                                     # per-class drop of each unit
  dissect probe acts.h5 --labels targets --out probes      # or --labels labels.npy
  dissect similarity acts.h5 --out results                 # CKA, intrinsic dimension, PCA
  dissect attribute mobilenet_v2-imagenet --image samples --method ig --out maps
  dissect attribute torchvision:resnet18 --weights r18.pth --image cat.jpg --method gradcam \\
      --target 281 --out maps --device cuda
  dissect deconv mobilenet_v2-imagenet --layer features.7 --units 0-15 --data samples --out zf
  dissect actmax mobilenet_v2-imagenet --layer features.10 --units 0-63 --out actmax
  dissect invert mobilenet_v2-imagenet --layer features.6 --image cat.jpg --out inverted
  dissect report r18-dissect          # writes r18-dissect/report/index.html
  dissect compare r18-dissect result/tally.csv --layers layer4=tally   # vs NetDissect-Lite
  dissect data check ./my_masks       # validate your own concept data (SegmentationFolder)
  dissect data broden ./dataset       # download Broden: resumable, checked, unpacked atomically
  dissect data resize ./dataset/broden1_224 broden_64 --size 64    # for CIFAR-size networks
  torchrun --nproc_per_node=8 -m dissect netdissect torchvision:resnet18 --weights r18.pth \\
      --dataset broden:broden1_224 --layers layer4 --out r18-dissect   # one process per GPU
  dissect demo --out demo-out

run `dissect COMMAND --help` for a command's options.
"""


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit code 2)."""

    def error(self, message: str):  # argparse calls this on a usage error
        message = one_line(message)  # a value holding a line break stays on the one line
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``dissect`` argument parser (exposed for documentation and tests)."""
    from .. import __version__

    parser = Parser(
        prog="dissect",
        description="Open trained PyTorch networks layer by layer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"torch-dissect {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        module.add_parser(sub).set_defaults(func=module.run)
    return parser


class _MessageFormatter(logging.Formatter):
    """Log records as messages: ``text``, ``warning: text``, ``error: text``."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        if record.levelno >= logging.WARNING:
            return f"warning: {text}"
        return text


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record is emitted."""

    @property
    def stream(self):  # looked up each time: a redirected stderr is followed
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property wins
        pass


def configure_logging(quiet: bool = False, verbose: bool = False) -> logging.Handler:
    """Send the command's log records to stderr as plain messages.

    Parameters
    ----------
    quiet
        Warnings and errors only.
    verbose
        The toolkit's debug messages too (other libraries' from INFO up), each as
        ``LEVEL logger.name: message``.

    Returns
    -------
    logging.Handler
        The handler installed on the root logger; one installed by an earlier call is removed
        (``main`` can run more than once in one process).
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s") if verbose
                         else _MessageFormatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    logging.getLogger("dissect").setLevel(logging.DEBUG if verbose else logging.NOTSET)
    return handler


def _command_parser(parser: argparse.ArgumentParser,
                    args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``args`` chose: ``dissect data check``'s for that action."""
    for dest in ("command", "data_action"):
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)),
                   None)
        if sub is None or getattr(args, dest, None) is None:
            break
        parser = sub.choices[getattr(args, dest)]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dissect`` console script."""
    # OpenCV's own decoder warnings ("[ WARN:0@...] ...") would precede our one-line error
    # about the same file; set before cv2 is first imported (a user's own setting wins)
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # name the (sub)command, whose --help lists what it takes
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    configure_logging(quiet=args.quiet, verbose=args.verbose)
    name = " ".join(filter(None, (args.command, getattr(args, "data_action", None))))
    try:
        return args.func(args)
    except DissectError as exc:
        sys.stderr.write(f"dissect {name}: error: {one_line(exc) or type(exc).__name__}\n")
        return 1
    except OSError as exc:  # a path the operating system refused: name it, no traceback
        sys.stderr.write(f"dissect {name}: error: {os_error_message(exc)}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; a rerun of the same command resumes where it stopped\n")
        return 130
