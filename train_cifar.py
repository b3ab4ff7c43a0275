#!/usr/bin/env python
"""Train a CIFAR ResNet with SPEM attention: the checkout's entry to the trainer, with the
original command line (`python -m spem_kernels.train` is the same; see its --help).

    python train_cifar.py --dataset cifar10 --block-name bottleneck --depth 164 \\
        --epochs 164 --schedule 81 122 --gamma 0.1 --wd 1e-4 --checkpoint checkpoints/c10-spem
    torchrun --nproc_per_node=4 train_cifar.py ...      # DistributedDataParallel, one GPU each
"""
import sys

from spem_kernels.train import main

if __name__ == "__main__":
    main(sys.argv[1:])
