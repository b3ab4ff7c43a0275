"""A training step captured once in a CUDA graph and replayed (the trainer's --cuda-graph).

At CIFAR sizes a ResNet-164 step is bound by the host: hundreds of small kernels, each
launched from Python. Replaying a captured step launches them all at once. What a graph
replays is the recorded kernels on the recorded memory, so the step must read its batch
from fixed buffers, and everything it reads (model, optimizer state, those buffers) must
stay alive while it replays: this object holds them.
"""
import torch

from .timing import check_warmup, on_side_stream, record


class CapturedStep:
    """`step(images, labels) -> tensors`, run through a CUDA graph for batches of batch_size.

    `step` does a whole training step (zero_grad, forward, backward, optimizer step) and
    returns tensors (loss terms, counts); replays overwrite them, so read them before the
    next call. The first `warmup` (>= 1) calls run eagerly on a side stream, as capture
    requires (cuDNN autotuning, cuBLAS handles, Triton compilation and the optimizer's
    momentum buffers happen there: made inside the graph, the buffers would be made anew at
    every replay; the steps are real ones), the next one captures the step and replays it.
    A batch of another size (the last partial batch of an epoch) runs uncaptured. `reset()`
    drops the graph, to capture again: after anything the graph holds as a constant
    changes, such as the learning rate. Every capture records into one memory pool, so
    capturing anew each epoch reuses the memory of the graph it replaces.
    """

    def __init__(self, step, batch_size, warmup=3):
        check_warmup(warmup)
        self.step, self.batch_size, self.warmup = step, batch_size, warmup
        self.warm_calls = 0
        self.pool = None  # made at the first capture: CPU-only code never touches CUDA
        self.reset()

    def __call__(self, images, labels):
        if len(images) != self.batch_size:
            return self.step(images, labels)  # a partial batch: uncaptured
        if self.warm_calls < self.warmup:
            self.warm_calls += 1
            return on_side_stream(lambda: self.step(images, labels))
        if self.graph is None:
            self.images, self.labels = images.clone(), labels.clone()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            # recorded, not run: the step runs at the replay below
            self.graph, self.outputs = record(lambda: self.step(self.images, self.labels),
                                              self.pool)
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()
        return self.outputs

    def reset(self):
        self.graph = self.outputs = self.images = self.labels = None
