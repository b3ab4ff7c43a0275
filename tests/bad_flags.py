"""Flags that cannot work, each with the one line the trainer (and reproduce) must print for
it: `error: <this>`, exit status 2, before any data is read. For test_training and
test_reproduce, whose base flags are a basicblock ResNet-8 trained for 2 epochs.

A helper module, not a test file.
"""

BAD_FLAGS = [  # (flags added, the message): each names the flag and what is valid
    (["--depth", "10"], "argument --depth: depth of a basicblock ResNet must be 6n + 2 with "
                        "n >= 1 (e.g. 8, 14, ...), got 10"),
    (["--block-name", "Bottleneck", "--depth", "164", "--depth", "50"],
     "argument --depth: depth of a bottleneck ResNet must be 9n + 2 with n >= 1 (e.g. 11, "
     "20, ...), got 50"),
    (["--block-name", "resnext"], "argument --block-name: invalid choice: 'resnext' (choose "
                                  "from 'bottleneck', 'basicblock')"),
    (["--schedule", "0", "1"], "argument --schedule: milestones must be increasing epochs in "
                               "1..2 (--epochs), got 0 1"),
    (["--schedule", "3"], "argument --schedule: milestones must be increasing epochs in 1..2 "
                          "(--epochs), got 3"),
    (["--schedule", "2", "1"], "argument --schedule: milestones must be increasing epochs in "
                               "1..2 (--epochs), got 2 1"),
    (["--schedule", "1", "1"], "argument --schedule: milestones must be increasing epochs in "
                               "1..2 (--epochs), got 1 1"),
    (["--train-batch", "0"], "argument --train-batch: must be at least 1, got 0"),
    (["--test-batch", "-5"], "argument --test-batch: must be at least 1, got -5"),
    (["--lr", "-0.1"], "argument --lr: must be >= 0, got -0.1"),
    (["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["--workers", "-1"], "argument --workers: must be >= 0, got -1"),
    (["--resume", "nowhere/checkpoint.pth.tar"],
     "argument --resume: no such file: nowhere/checkpoint.pth.tar"),
    (["--depth", "ten"], "argument --depth: invalid int value: 'ten'"),
    (["--backend", "cuda"], "argument --backend: invalid choice: 'cuda' (choose from 'auto', "
                            "'triton', 'native', 'eager')"),
    (["--amp", "fp8"], "argument --amp: invalid choice: 'fp8' (choose from 'bf16', 'fp16', "
                       "'none')"),
]
