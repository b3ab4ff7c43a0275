"""Train a CIFAR ResNet with SPEM attention (the original trainer's command line works).

    python -m spem_kernels.train --dataset cifar10 --block-name bottleneck --depth 164 \\
        --epochs 164 --schedule 81 122 --gamma 0.1 --wd 1e-4 --checkpoint checkpoints/c10-spem
    torchrun --nproc_per_node=4 -m spem_kernels.train ...  # DistributedDataParallel, one GPU each

In a checkout, `python train_cifar.py` is the same. Exit status: 0 when the run ends; 2 for
an error the user can fix (missing data, a bad checkpoint, flags that do not fit), printed as
`error: ...` without a traceback; 1 for any other error, after its traceback; 130 on Ctrl-C.
Under torchrun each message starts with the rank (`rank 1: error: ...`).
"""
import argparse
import os
import sys
import traceback

from . import training
from .backends import NAMES as BACKENDS
from .models import ATTENTIONS, BLOCKS, blocks_per_stage

# The flags: (names, argparse keywords). One table, so that reproduce takes the same flags
# (less those it sets per run) and can write a run's command line back (to_argv).
FLAGS = [
    (("-d", "--dataset"), dict(default="cifar10", choices=sorted(training.NUM_CLASSES))),
    (("--data-dir",), dict(default="./data",
                           help="folder with the extracted data set or its archive "
                                "(downloaded if missing)")),
    (("--depth",), dict(type=int, default=164, help="9n+2 (bottleneck) or 6n+2 (basicblock)")),
    (("--block-name",), dict(default="bottleneck", type=str.lower, choices=BLOCKS)),
    (("--attention",), dict(default="spem", choices=ATTENTIONS)),
    (("--backend",), dict(default="auto", choices=("auto",) + BACKENDS, help="SPEM kernels")),
    (("--no-fuse-bn",), dict(dest="fuse_bn", action="store_false",
                             help="keep each block's last BatchNorm a module of its own, called "
                                  "before the SPEM op (default: inside it, spem_bn: same "
                                  "values, less memory)")),
    (("--epochs",), dict(type=int, default=164)),
    (("--schedule",), dict(type=int, nargs="+", default=[81, 122],
                           help="epochs (0-based) at whose start the lr is multiplied by "
                                "--gamma: increasing, each in 1..--epochs")),
    (("--gamma",), dict(type=float, default=0.1)),
    (("--lr", "--learning-rate"), dict(type=float, default=0.1)),
    (("--momentum",), dict(type=float, default=0.9)),
    (("--wd", "--weight-decay"), dict(type=float, default=1e-4)),
    (("--alpha",), dict(type=float, default=0.1, help="weight of the SPEM penalty")),
    (("--train-batch",), dict(type=int, default=128,
                              help="global batch, split evenly over torchrun processes")),
    (("--test-batch",), dict(type=int, default=100, help="per process")),
    (("-c", "--checkpoint"), dict(default=None,
                                  help="output folder (default: the --resume file's folder, "
                                       "else ./checkpoint)")),
    (("--resume",), dict(default="", help="checkpoint file to resume from (or evaluate)")),
    (("-e", "--evaluate"), dict(action="store_true",
                                help="only test --resume (default: "
                                     "<checkpoint>/model_best.pth.tar)")),
    (("--manualSeed",), dict(type=int, default=None)),
    (("--amp",), dict(default="none", choices=sorted(training.AMP_DTYPES))),
    (("--channels-last",), dict(action="store_true")),
    (("--compile",), dict(action="store_true", help="torch.compile the model")),
    (("--cuda-graph",), dict(action="store_true",
                             help="capture the training step in a CUDA graph and replay it "
                                  "(one CUDA process; not with --amp fp16 or --compile). "
                                  "Captured anew each epoch (the learning rate is a constant "
                                  "in the graph); the last, partial batch of an epoch runs "
                                  "uncaptured")),
    (("--device",), dict(default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")),
    (("-j", "--workers"), dict(type=int, default=0,
                               help="ignored, kept for old command lines: the data lives on "
                                    "the device")),
]


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are UserErrors: one line, `error: argument --FLAG:
    ...`, exit status 2 (main prints it; under torchrun with the rank), no usage block."""

    def error(self, message):
        raise training.UserError(message)


def _dest(names, kw):
    return kw.get("dest") or next(n for n in names if n.startswith("--"))[2:].replace("-", "_")


def add_flags(parser, skip=()):
    """Add the trainer's flags to `parser`, less those whose destination is in `skip`."""
    for names, kw in FLAGS:
        if _dest(names, kw) not in skip:
            parser.add_argument(*names, **kw)


def parse_args(argv=None):
    """The flags parsed (not checked: check_flags does that)."""
    parser = Parser(description=__doc__.splitlines()[0])
    add_flags(parser)
    return parser.parse_args(argv)


def check_flags(args):
    """Raise a UserError naming the first flag whose value cannot work, and what is valid.
    Nothing here reads data or weights: a mistyped flag is reported before any download.
    (Flags that fit only some machines, --device and --cuda-graph, are the trainer's own
    checks at start.) reproduce checks each of its runs with this too."""
    def bad(flag, what):
        raise training.UserError(f"argument {flag}: {what}")

    try:
        blocks_per_stage(args.depth, args.block_name)
    except ValueError as e:
        bad("--depth", str(e))
    if args.epochs < 1:
        bad("--epochs", f"must be at least 1, got {args.epochs}")
    milestones = args.schedule
    if any(m < 1 or m > args.epochs for m in milestones) \
            or any(a >= b for a, b in zip(milestones, milestones[1:])):
        bad("--schedule", f"milestones must be increasing epochs in 1..{args.epochs} "
                          f"(--epochs), got {' '.join(map(str, milestones))}")
    for flag in ("--train-batch", "--test-batch"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < 1:
            bad(flag, f"must be at least 1, got {value}")
    for flag in ("--lr", "--momentum", "--wd", "--alpha"):
        if getattr(args, flag[2:]) < 0:
            bad(flag, f"must be >= 0, got {getattr(args, flag[2:])}")
    if args.workers < 0:
        bad("--workers", f"must be >= 0, got {args.workers}")
    if args.resume and not os.path.isfile(args.resume):
        bad("--resume", f"no such file: {args.resume}")


def to_argv(args, skip=()):
    """The command line that parse_args turns back into `args` (the flags whose value is not
    the default, less those in `skip`): a run's command, written out."""
    argv = []
    for names, kw in FLAGS:
        dest = _dest(names, kw)
        if dest in skip or not hasattr(args, dest):
            continue
        value, flag = getattr(args, dest), next(n for n in names if n.startswith("--"))
        action = kw.get("action")
        default = kw.get("default", action == "store_false")
        if value == default:
            continue
        if action in ("store_true", "store_false"):
            argv.append(flag)
        else:
            argv += [flag, *map(str, value if isinstance(value, list) else [value])]
    return argv


def main(argv=None):
    """Run the trainer with these command-line flags (default: sys.argv[1:]); returns the
    best test accuracy. A failed run ends the process with the exit status above."""
    try:
        args = parse_args(argv)
        check_flags(args)
        return training.run(args)
    except training.UserError as e:
        _exit(2, f"error: {e}")
    except KeyboardInterrupt:
        _exit(130, "interrupted")
    except Exception as e:
        traceback.print_exc()
        _exit(1, f"error: {type(e).__name__}: {e}")


def _exit(status, message):
    """Print the message (naming the rank under torchrun) to stderr and exit."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        message = f"rank {os.environ.get('RANK', 0)}: {message}"
    print(message, file=sys.stderr, flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
