"""The paper's published results and recipe (SPEM.md; Zhong, Wen, Qin, MultiMedia Modeling
2023): the one home in code of the figures SPEM.md's table shows (tests/test_reproduce.py
keeps the two equal, and the trainer's defaults equal to RECIPE).
"""
MODEL = "ResNet-164"
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
# Best test accuracy (%) over all epochs, plain network ("none") and with SPEM.
BEST_ACC = {"cifar10": {"none": 93.39, "spem": 94.80},
            "cifar100": {"none": 74.30, "spem": 76.31}}
# The recipe, as the trainer's flags (their destinations).
RECIPE = {"block_name": "bottleneck", "depth": 164, "epochs": 164, "schedule": [81, 122],
          "gamma": 0.1, "lr": 0.1, "momentum": 0.9, "wd": 1e-4, "train_batch": 128,
          "test_batch": 100}
