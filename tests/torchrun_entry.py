"""A torchrun entry for test_training.py: spem_kernels.train.main, with what the tests need
added from outside the trainer.

- FAIL_RANK=r: rank r raises RuntimeError("injected failure") at the start of its second
  evaluation. Epoch 2's training needed every rank, so rank 0 has written epoch 1's files.
- After a run that ends, exit 3 if a thread of the gloo process group is still alive: the
  group was not destroyed (see spem_kernels.training._teardown). Linux only (/proc).
"""
import os
import sys

from spem_kernels import train, training

GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


def fail_in_second_evaluation(rank):
    evaluate, calls = training.evaluate, []

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            raise RuntimeError(f"injected failure in rank {rank}")
        return evaluate(*args, **kwargs)

    training.evaluate = failing


def thread_names():
    tasks = "/proc/self/task"
    return [open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)]


if __name__ == "__main__":
    if os.environ.get("FAIL_RANK") == os.environ["RANK"]:
        fail_in_second_evaluation(os.environ["RANK"])
    train.main(sys.argv[1:])
    if os.path.isdir("/proc/self/task"):
        alive = [name for name in thread_names() if name in GLOO_THREADS]
        if alive:
            sys.exit(f"rank {os.environ['RANK']}: the process group outlived the run: {alive}")
