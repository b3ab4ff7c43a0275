"""Curves of trainer runs side by side: test accuracy and train loss per epoch, plain against
SPEM, one row of plots per data set.

    python -m spem_kernels.curves RUN_DIR... -o FILE.png [--paper] [--data-name NAME]

A RUN_DIR is a trainer's output folder (--checkpoint): its log.txt gives the curves, its
checkpoint (or a name such as reproduce's cifar10-spem-s1) the data set and the attention.
--paper adds the paper's best accuracies (spem_kernels.paper) as dashed lines; --data-name
names the data in the titles (runs on data of one's own in CIFAR format). reproduce draws
DIR/curves.png with this.
"""
import argparse
import dataclasses
import os
import re
import sys

from . import paper, training

COLOURS = {"none": "tab:blue", "spem": "tab:red", None: "tab:gray"}
LABELS = {"none": "plain", "spem": "SPEM", None: "?"}
RUN_NAME = re.compile(r"^(?P<dataset>[a-z0-9]+)-(?P<attention>none|spem)-s(?P<seed>\d+)$")


@dataclasses.dataclass
class Curve:
    """One run's curves: `log` is training.read_log's {column: values per epoch}."""
    label: str
    dataset: str | None
    attention: str | None
    log: dict


def load(folder):
    """The Curve of a trainer's output folder; a FileNotFoundError names what is missing."""
    log = os.path.join(folder, "log.txt")
    if not os.path.isfile(log):
        raise FileNotFoundError(f"{folder} holds no log.txt: not a trainer's output folder")
    dataset = attention = None
    ckpt = os.path.join(folder, "checkpoint.pth.tar")
    if os.path.isfile(ckpt):
        args = training.checkpoint_summary(ckpt).get("args", {})
        dataset, attention = args.get("dataset"), args.get("attention")
    else:
        named = RUN_NAME.match(os.path.basename(os.path.normpath(folder)))
        if named:
            dataset, attention = named["dataset"], named["attention"]
    label = os.path.basename(os.path.normpath(folder))
    return Curve(label, dataset, attention, training.read_log(log))


def draw(curves, path, paper_lines=False, data_name=None):
    """Write the figure of `curves` to `path` (PNG, atomically): per data set, test accuracy
    and train cross-entropy per epoch; with paper_lines, the paper's best accuracies;
    data_name, if given, in the titles in place of the data set's name."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    datasets = sorted({c.dataset for c in curves}, key=lambda d: (d is None, d or ""))
    fig = Figure(figsize=(11, 3.8 * max(1, len(datasets))))
    axes = fig.subplots(max(1, len(datasets)), 2, squeeze=False)
    for (acc_ax, loss_ax), dataset in zip(axes, datasets):
        name = data_name or paper.DATASET_NAMES.get(dataset, dataset or "runs")
        for c in sorted((c for c in curves if c.dataset == dataset),
                        key=lambda c: (c.attention != "none", c.label)):
            epochs = range(1, len(c.log["Valid Acc."]) + 1)
            style = dict(color=COLOURS.get(c.attention, "tab:gray"), alpha=0.85, lw=1.3)
            label = f"{LABELS.get(c.attention, c.attention)}: {c.label}"
            acc_ax.plot(epochs, c.log["Valid Acc."], label=label, **style)
            loss_ax.plot(epochs, c.log["Classify Loss"], label=label, **style)
        if paper_lines and dataset in paper.BEST_ACC:
            for attention, acc in paper.BEST_ACC[dataset].items():
                acc_ax.axhline(acc, color=COLOURS[attention], ls="--", lw=1,
                               label=f"paper, {LABELS[attention]} ({paper.MODEL}): {acc:.2f}")
        acc_ax.set_title(f"{name}: test accuracy", fontsize=10)
        acc_ax.set_ylabel("accuracy (%)")
        loss_ax.set_title(f"{name}: train loss (cross-entropy)", fontsize=10)
        loss_ax.set_ylabel("loss")
        loss_ax.set_yscale("log")  # late epochs' losses, a decade or two below the first
        loss_ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        loss_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        loss_ax.yaxis.set_minor_formatter(NullFormatter())
        for ax in (acc_ax, loss_ax):
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    training.replace_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="trainer output folders")
    parser.add_argument("-o", "--output", required=True, metavar="FILE.png")
    parser.add_argument("--paper", action="store_true",
                        help="draw the paper's best accuracies as dashed lines")
    parser.add_argument("--data-name", default=None,
                        help="the data's name in the titles (default: CIFAR-10 or CIFAR-100, "
                             "from the runs' flags)")
    args = parser.parse_args(argv)
    try:
        curves = [load(folder) for folder in args.runs]
    except (OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    draw(curves, args.output, args.paper, args.data_name)
    print(f"wrote {args.output}: {len(curves)} run(s)")


if __name__ == "__main__":
    main()
