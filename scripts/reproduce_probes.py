"""Reproduce Alain & Bengio's linear-probe figure (2016): accuracy rises with depth and training.

A small CNN is trained on scikit-learn's real handwritten digits (``load_digits``: 1,797 8x8
images, 10 classes) on the CPU. The images are split in two halves: the CNN trains on one, the
probes read the other (so no probe ever sees an image the network was trained on). At several
epochs (0 = random initialization) every layer's output over the probe half is captured to an
activation store (flattened, ``pool=None``) and probed with ``dissect.probes.probe``: features
standardized, reduced to ``--max-features`` principal components, L2 strength chosen on a
validation split, plus the permuted-label control. The script prints the test accuracy of every
layer at every epoch and draws them (one line per epoch) to ``probes_vs_depth.png``.

Expected (Alain & Bengio, Fig. 5 / 8): at every epoch, test accuracy grows with depth; with
training, the deeper layers' accuracy rises. A random network already gives its early layers
most of the input's linear decodability (the input pixels are ~95% linearly decodable).

Run (well under 2 minutes on 2 CPU cores; ``--threads 1`` on a machine shared with other jobs)::

    python scripts/reproduce_probes.py --out probes-digits
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dissect.hooks import capture
from dissect.probes import ProbeResult, probe

LAYERS = ["input", "relu1", "relu2", "pool", "relu3", "relu4", "logits"]


class DigitsCNN(nn.Sequential):
    """input -> conv 16 -> conv 32 -> maxpool -> conv 32 -> fc 64 -> fc 10 (ReLUs between)."""

    def __init__(self) -> None:
        super().__init__()
        self.input = nn.Identity()  # a named layer for the raw pixels (depth 0)
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.relu4 = nn.ReLU()
        self.logits = nn.Linear(64, 10)


def load_digits_halves(seed: int) -> tuple[torch.Tensor, ...]:
    """Real digits as (N, 1, 8, 8) floats in [0, 1]: (train x, train y, probe x, probe y)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    half = len(x) // 2
    a, b = perm[:half], perm[half:]
    return x[a], y[a], x[b], y[b]


def train_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                opt: torch.optim.Optimizer, gen: torch.Generator) -> float:
    model.train()
    total = 0.0
    for idx in torch.randperm(len(x), generator=gen).split(32):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / len(x)


def plot_epochs(results: dict[int, ProbeResult], path: Path) -> Path:
    """Left: test accuracy vs depth per epoch, with control and chance. Right: test error (log
    scale, as Alain & Bengio plot it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    x = np.arange(len(LAYERS))
    colors = ["#c6dbef", "#9ecae1", "#4292c6", "#2171b5", "#08306b", "#000000"]
    for k, (epoch, res) in enumerate(sorted(results.items())):
        acc = np.array([res[layer].test_accuracy for layer in LAYERS])
        color = colors[min(k, len(colors) - 1)]
        left.plot(x, acc, "o-", color=color, label=f"epoch {epoch}")
        right.plot(x, np.maximum(1 - acc, 1e-3), "o-", color=color, label=f"epoch {epoch}")
    last = results[max(results)]
    left.plot(x, [last[layer].control_test_accuracy for layer in LAYERS], "s--", color="gray",
              alpha=0.6, label="control test (permuted labels)")
    left.axhline(last[LAYERS[0]].chance, color="gray", ls=":", label="chance (majority)")
    left.set_ylim(0, 1.02)
    left.set_ylabel("probe test accuracy")
    right.set_yscale("log")
    right.set_ylabel("probe test error (log)")
    for ax in (left, right):
        ax.set_xticks(x)
        ax.set_xticklabels(LAYERS)
        ax.set_xlabel("layer (depth)")
        ax.grid(alpha=0.3)
    left.legend(fontsize=7, loc="lower left")
    right.legend(fontsize=7, loc="upper left")
    fig.suptitle("Linear probes on a digits CNN during training (Alain & Bengio 2016)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("probes-digits"))
    p.add_argument("--epochs", default="0,1,3,10,30", help="epochs to probe at (0,1,3,10,30)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (3e-3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is fastest on a busy machine)")
    p.add_argument("--max-features", type=int, default=128, help="PCA components per layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="probe device (default: cuda if present)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    epochs = sorted({int(e) for e in args.epochs.split(",")})
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    xtr, ytr, xpr, ypr = load_digits_halves(args.seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[int, ProbeResult] = {}
    cnn: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="probes-digits-") as tmp:
        done = 0
        for epoch in epochs:
            while done < epoch:
                loss = train_epoch(model, xtr, ytr, opt, gen)
                done += 1
                logging.info("epoch %d: train loss %.4f", done, loss)
            model.eval()
            with torch.no_grad():
                cnn_acc = cnn[epoch] = float((model(xpr).argmax(1) == ypr).float().mean())
            store = capture(model, xpr, LAYERS, Path(tmp) / f"epoch{epoch}.h5", pool=None,
                            dtype="float32", batch_size=256, device="cpu",
                            progress=not args.quiet)
            with store:
                res = probe(store, ypr, pool=None, max_features=args.max_features,
                            seed=args.seed, device=args.device, progress=not args.quiet)
            res.to_json(args.out / f"probes_epoch{epoch}.json")
            results[epoch] = res
            print(f"\n== epoch {epoch}: the CNN's own accuracy on the probe half {cnn_acc:.3f}")
            print(res.summary())

    print("\nProbe test accuracy (%) by layer and epoch (control test accuracy in brackets)")
    print(f"{'layer':<8} {'features':>8}" + "".join(f"{'epoch ' + str(e):>16}" for e in epochs)
          + f"{'gain':>8}")
    for layer in LAYERS:
        first, last = results[epochs[0]][layer], results[epochs[-1]][layer]
        row = f"{layer:<8} {first.input_features:>8}"
        for e in epochs:
            r = results[e][layer]
            row += f"{100 * r.test_accuracy:>9.1f} [{100 * r.control_test_accuracy:4.1f}]"
        print(row + f"{100 * (last.test_accuracy - first.test_accuracy):>+8.1f}")
    print(f"{'CNN':<8} {'':>8}" + "".join(f"{100 * cnn[e]:>9.1f}{'':7}" for e in epochs))
    path = plot_epochs(results, args.out / "probes_vs_depth.png")
    print(f"\nwrote {path} and probes_epoch*.json in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
