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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-d", "--dataset", default="cifar10", choices=sorted(training.NUM_CLASSES))
    parser.add_argument("--data-dir", default="./data",
                        help="folder with the extracted data set or its archive (downloaded if "
                             "missing)")
    parser.add_argument("--depth", type=int, default=164,
                        help="9n+2 (bottleneck) or 6n+2 (basicblock)")
    parser.add_argument("--block-name", default="bottleneck", help="bottleneck or basicblock")
    parser.add_argument("--attention", default="spem", choices=("spem", "none"))
    parser.add_argument("--backend", default="auto",
                        help="SPEM kernels: auto, triton, native, eager")
    parser.add_argument("--no-fuse-bn", dest="fuse_bn", action="store_false",
                        help="keep each block's last BatchNorm a module of its own, called "
                             "before the SPEM op (default: inside it, spem_bn: same values, "
                             "less memory)")
    parser.add_argument("--epochs", type=int, default=164)
    parser.add_argument("--schedule", type=int, nargs="+", default=[81, 122],
                        help="epochs (0-based) at whose start the lr is multiplied by --gamma")
    parser.add_argument("--gamma", type=float, default=0.1)
    parser.add_argument("--lr", "--learning-rate", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--wd", "--weight-decay", type=float, default=1e-4)
    parser.add_argument("--alpha", type=float, default=0.1, help="weight of the SPEM penalty")
    parser.add_argument("--train-batch", type=int, default=128,
                        help="global batch, split evenly over torchrun processes")
    parser.add_argument("--test-batch", type=int, default=100, help="per process")
    parser.add_argument("-c", "--checkpoint", default=None,
                        help="output folder (default: the --resume file's folder, else "
                             "./checkpoint)")
    parser.add_argument("--resume", default="", help="checkpoint file to resume from (or evaluate)")
    parser.add_argument("-e", "--evaluate", action="store_true",
                        help="only test --resume (default: <checkpoint>/model_best.pth.tar)")
    parser.add_argument("--manualSeed", type=int, default=None)
    parser.add_argument("--amp", default="none", choices=sorted(training.AMP_DTYPES))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture the training step in a CUDA graph and replay it (one "
                             "CUDA process; not with --amp fp16 or --compile). Captured anew "
                             "each epoch (the learning rate is a constant in the graph); the "
                             "last, partial batch of an epoch runs uncaptured")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    parser.add_argument("-j", "--workers", type=int, default=0,
                        help="ignored, kept for old command lines: the data lives on the device")
    return parser.parse_args(argv)


def main(argv=None):
    """Run the trainer with these command-line flags (default: sys.argv[1:]); returns the
    best test accuracy. A failed run ends the process with the exit status above."""
    args = parse_args(argv)
    try:
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
