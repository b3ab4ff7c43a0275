"""The CIFAR trainer: data on the device, model, SGD, AMP, DDP, checkpoints, logs.

`run(args)` takes the flags of spem_kernels.train (any object with those attributes) and
leaves them as they are. One process trains on one device; under torchrun each process is
one rank of DistributedDataParallel (NCCL on GPUs, gloo on CPU) and trains on its shard;
rank 0 alone prints and writes files.

Read top to bottom: run, its set-up, the epoch loop and the end; then one training step,
an epoch and a test pass; checkpoints (checkpoint_state writes what restore reads); the
log; the processes. Uses models/, data/ and cuda_graphs; train.py (the command line),
benchmarks/ (make_train_step) and the tests use it.
"""
import dataclasses
import os
import random
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import provenance
from .cuda_graphs import CapturedStep
from .data import cifar
from .models import cifar_resnet

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
LOG_COLUMNS = ("Learning Rate", "Train Loss", "Classify Loss", "Parameter Loss", "Valid Loss",
               "Train Acc.", "Valid Acc.")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Wrappers whose state_dict keys carry a prefix: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class UserError(Exception):
    """An error the user can fix: data missing and not downloadable, a corrupt, foreign or
    unfitting checkpoint, flags that do not fit together. The command line
    (spem_kernels.train) prints its message without a traceback."""


def run(args):
    """Train (or with args.evaluate, evaluate) as the flags say; returns the best test accuracy.

    Raises UserError for what the user can fix. Under torchrun, every way out of here (the
    end, an error, Ctrl-C) first lets go of what holds the process group, then destroys it
    (see _teardown)."""
    device, rank, world = _setup_distributed(args)
    try:
        return _train_or_evaluate(args, device, rank, world)
    except BaseException as e:
        # The traceback's frames hold the DistributedDataParallel wrapper, which holds the
        # process group: clear their locals so that _teardown can destroy the group.
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        _teardown(world)


def _train_or_evaluate(args, device, rank, world):
    """Set-up, then the epoch loop and the end; with --evaluate, one test pass instead."""
    setup = _set_up(args, device, rank, world)
    if args.evaluate:
        loss, acc = evaluate(setup.eval_model, setup.test_loader, setup.autocast, world)
        if rank == 0:
            print(f" Test Loss:  {loss:.8f}, Test Acc:  {acc:.2f}")
        return acc
    best_acc = _epoch_loop(args, setup, rank, world)
    if rank == 0:
        print(f"Best acc: {best_acc:.2f}")
    return best_acc


# What a run has spent, summed over the processes that trained it (a resumed run carries on
# its checkpoint's): wall_s from each one's set-up to its last checkpoint (work lost to a
# crash after that is not counted), train_s in the training passes, train_images trained.
EFFORT = {"wall_s": 0.0, "train_s": 0.0, "train_images": 0}


@dataclasses.dataclass
class Setup:
    """What set-up made: everything the epoch loop (or --evaluate's test pass) uses."""
    folder: str                   # where checkpoints and logs go
    seed: int                     # the one used: the resumed run's, --manualSeed, or drawn
    train_loader: cifar.CifarLoader
    test_loader: cifar.CifarLoader
    net: torch.nn.Module          # the model itself, whose weights checkpoints hold
    eval_model: torch.nn.Module   # net, or with --compile its compiled form
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: torch.autocast
    resumed: bool = False         # training state restored from --resume
    start_epoch: int = 0
    best_acc: float = 0.0
    started: float = 0.0          # time.perf_counter() at this process's set-up
    effort: dict = dataclasses.field(default_factory=lambda: dict(EFFORT))
    history: list = dataclasses.field(default_factory=list)  # who trained: see _start_log


def _set_up(args, device, rank, world):
    """Seed, data, loaders, model, optimizer and scaler; then what --resume restores (with
    --evaluate, the checkpoint's weights alone)."""
    started = time.perf_counter()
    folder = args.checkpoint or (os.path.dirname(args.resume) if args.resume else "checkpoint")
    # the checkpoint to read: --resume; --evaluate's default is the output folder's best model
    path = args.resume or (os.path.join(folder, "model_best.pth.tar") if args.evaluate else "")
    ckpt = _read_checkpoint(path) if path else None
    seed = _choose_seed(args.manualSeed, ckpt, world)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    data = _load_data(args.dataset, args.data_dir, rank == 0, world)
    common = dict(device=device, rank=rank, world_size=world, channels_last=args.channels_last)
    train_loader = cifar.CifarLoader(data.train_images, data.train_labels,
                                     args.train_batch // world, train=True, seed=seed, **common)
    test_loader = cifar.CifarLoader(data.test_images, data.test_labels, args.test_batch,
                                    train=False, **common)

    net = _make_model(args, device)
    setup = Setup(
        folder=folder, seed=seed, train_loader=train_loader, test_loader=test_loader,
        started=started,
        net=net, eval_model=torch.compile(net) if args.compile else net,
        optimizer=make_optimizer(net, args.lr, args.momentum, args.wd),
        scaler=torch.amp.GradScaler(device.type, enabled=args.amp == "fp16"),
        # A CUDA graph must not keep autocast's cache of cast weights beyond its capture.
        autocast=torch.autocast(device.type, dtype=AMP_DTYPES[args.amp] or torch.float32,
                                enabled=args.amp != "none", cache_enabled=not args.cuda_graph))
    if args.evaluate:
        _load_weights(net, ckpt, path)
    elif ckpt is not None:
        setup.start_epoch, setup.best_acc = restore(setup, ckpt, path)
        setup.resumed = True
    return setup


def _epoch_loop(args, setup, rank, world):
    """Epochs setup.start_epoch + 1 to args.epochs: train, test, and on rank 0 log and write
    the checkpoints. Returns the best test accuracy."""
    main = rank == 0
    train_model, train_step = _training_step(args, setup, world)
    if main:
        _start_log(args, setup, world)
    best_acc = setup.best_acc
    for epoch in range(setup.start_epoch, args.epochs):
        lr = args.lr * args.gamma ** sum(epoch >= m for m in args.schedule)
        for group in setup.optimizer.param_groups:
            group["lr"] = lr
        if args.cuda_graph:  # the learning rate is a constant in the graph: capture anew
            train_step.reset()
        images_per_epoch = setup.train_loader.shard_size() * world
        t0 = time.perf_counter()
        with tqdm(total=images_per_epoch, unit="img", unit_scale=True,
                  desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                  disable=not (main and sys.stderr.isatty())) as bar:
            train_loss, ce_loss, param_loss, train_acc = train_epoch(
                train_model, train_step, setup.train_loader, world, bar)
        train_s = time.perf_counter() - t0
        speed = images_per_epoch / train_s
        setup.effort["train_s"] += train_s
        setup.effort["train_images"] += images_per_epoch
        if world > 1:  # rank 0's BatchNorm statistics are the ones saved: test with them
            for buffer in setup.net.buffers():
                dist.broadcast(buffer, 0)
        valid_loss, valid_acc = evaluate(setup.eval_model, setup.test_loader, setup.autocast, world)
        best_acc = max(best_acc, valid_acc)
        if main:
            print(f"epoch {epoch + 1}/{args.epochs}  lr {lr:.4g}  train loss {train_loss:.4f} "
                  f"(ce {ce_loss:.4f} + param {param_loss:.4f}) acc {train_acc:.2f}  "
                  f"valid loss {valid_loss:.4f} acc {valid_acc:.2f}  {speed:.0f} img/s",
                  flush=True)
            _log_epoch(setup.folder, (lr, train_loss, ce_loss, param_loss, valid_loss,
                                      train_acc, valid_acc))
            state = checkpoint_state(setup, args, epoch + 1, valid_acc, best_acc)
            save_atomic(state, os.path.join(setup.folder, "checkpoint.pth.tar"))
            if valid_acc == best_acc:
                save_atomic(state, os.path.join(setup.folder, "model_best.pth.tar"))
    return best_acc


def _choose_seed(manual_seed, ckpt, world):
    """The resumed checkpoint's seed (the data order of later epochs depends on it), else
    --manualSeed, else one drawn by rank 0; the same on every rank."""
    seed = (ckpt or {}).get("args", {}).get("manualSeed")
    seed = manual_seed if seed is None else seed
    return _broadcast(random.randint(1, 10000) if seed is None else seed, world)


def _make_model(args, device):
    try:
        net = cifar_resnet(args.depth, NUM_CLASSES[args.dataset], args.block_name,
                           args.attention, args.backend,
                           args.fuse_bn).to(device)
    except ValueError as e:  # --depth, --block-name, --attention or --backend
        raise UserError(str(e)) from e
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def _training_step(args, setup, world):
    """(the model to train: net, DDP-wrapped and compiled as the flags say; its step)."""
    model = DistributedDataParallel(setup.net) if world > 1 else setup.net
    if args.compile:
        model = torch.compile(model)
    step = make_train_step(model, setup.net, setup.optimizer, setup.scaler, setup.autocast,
                           args.alpha)
    if args.cuda_graph:
        step = CapturedStep(step, setup.train_loader.batch_size)
    return model, step


def _load_data(name, root, main, world):
    """The data set, read by every rank once rank 0 has made it ready (downloaded and
    extracted, if need be). When rank 0 cannot, every rank raises its UserError."""
    problem = None
    if main:
        try:
            cifar.prepare(name, root)
        except (OSError, ValueError) as e:
            problem = str(e)
    problem = _broadcast(problem, world)  # the others wait here for rank 0
    if problem:
        raise UserError(problem)
    try:
        return cifar.load_cifar(name, root, download=False)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from e


def make_optimizer(net, lr, momentum, weight_decay):
    """SGD with weight decay on every parameter, SPEM's included, as the original trainer did.
    foreach: one multi-tensor update for all parameters, on CPU too (where torch's default is
    a Python loop over them; SPEM adds five small parameters per block, 270 in ResNet-164)."""
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum,
                           weight_decay=weight_decay, foreach=True)


def make_train_step(model, net, optimizer, scaler, autocast, alpha):
    """step(images, labels) -> (loss, cross-entropy, alpha * penalty, correct count): one
    whole SGD step (zero_grad, forward, backward, update), results as tensors on the device.
    It moves nothing between host and device, so it can be captured in a CUDA graph."""

    def step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = model(images)
        ce = F.cross_entropy(logits.float(), labels)
        penalty = alpha * net.spem_penalty()
        loss = ce + penalty
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach(), ce.detach(), penalty.detach(), (logits.argmax(1) == labels).sum()

    return step


def train_epoch(model, step, loader, world, bar):
    """One pass over this rank's shard with `step` (make_train_step's, or its captured form);
    returns the epoch's mean (total loss, cross-entropy, alpha * penalty, accuracy %) over all
    ranks. Sums stay on the device: no per-step sync."""
    model.train()
    sums = torch.zeros(4, dtype=torch.float64, device=loader.device)
    for x, y in loader:
        loss, ce, penalty, correct = step(x, y)
        n = len(y)
        sums += torch.stack([loss * n, ce * n, penalty * n, correct.float()]).double()
        bar.update(n * world)
    total, ce, param, correct = _all_reduce(sums, world).tolist()
    count = loader.shard_size() * world  # every rank trains on a shard of the same size
    return total / count, ce / count, param / count, 100.0 * correct / count


@torch.no_grad()
def evaluate(model, loader, autocast, world):
    """(mean cross-entropy, accuracy %) over the whole test set, all ranks together."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=loader.device)
    for x, y in loader:
        with autocast:
            logits = model(x)
        sums += torch.stack([F.cross_entropy(logits.float(), y, reduction="sum"),
                             (logits.argmax(1) == y).sum().float(),
                             logits.new_tensor(len(y), dtype=torch.float32)]).double()
    loss, correct, count = _all_reduce(sums, world).tolist()
    return loss / count, 100.0 * correct / count


# --- checkpoints ---

def save_atomic(obj, path):
    """torch.save, atomically (replace_atomic)."""
    replace_atomic(path, lambda f: torch.save(obj, f))


def replace_atomic(path, write):
    """write(f) into a temporary binary file in the same folder, fsync, then rename it over
    `path`: a crash at any moment leaves either the previous file or the new one, whole."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path):
    """A checkpoint dict with a prefix-free 'state_dict'. Reads only tensors and plain data
    (weights_only=True). Accepts a bare state dict too; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if isinstance(ckpt, dict) and ckpt and "state_dict" not in ckpt \
            and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"state_dict": ckpt}
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{path} is not a CIFAR ResNet checkpoint: expected a dict with a "
                         f"'state_dict' entry, got {type(ckpt).__name__}"
                         + (f" with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict)
                            else ""))
    ckpt["state_dict"] = strip_wrapper_prefixes(ckpt["state_dict"])
    return ckpt


def checkpoint_summary(path):
    """What a checkpoint says about its run, cheaply: its entries but the tensors (epoch,
    acc, best_acc, args, effort, history), read with weights_only=True through a memory map,
    so that the weights are not read. Errors name the file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise RuntimeError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict):
        raise RuntimeError(f"{path} is not a trainer's checkpoint (a {type(ckpt).__name__})")
    return {k: v for k, v in ckpt.items()
            if k not in ("state_dict", "optimizer", "scaler", "rng")}


def strip_wrapper_prefixes(state_dict):
    """Drop the 'module.' (DataParallel/DDP) and '_orig_mod.' (torch.compile) key prefixes."""
    def strip(key):
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        return key
    return {strip(k): v for k, v in state_dict.items()}


def _read_checkpoint(path):
    try:
        return load_checkpoint(path)
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(str(e)) from e


def checkpoint_state(setup, args, epoch, acc, best_acc):
    """What a checkpoint holds after `epoch` epochs; restore() reads it back."""
    return {
        "epoch": epoch, "state_dict": setup.net.state_dict(), "acc": acc, "best_acc": best_acc,
        "optimizer": setup.optimizer.state_dict(), "scaler": setup.scaler.state_dict(),
        # the flags as given, with the seed actually used: a resumed run takes that seed
        "args": dict(vars(args), manualSeed=setup.seed),
        "effort": dict(setup.effort,
                       wall_s=setup.effort["wall_s"] + time.perf_counter() - setup.started),
        "history": setup.history,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "data": setup.train_loader.get_state()},
    }


def restore(setup, ckpt, path):
    """Put the run back where checkpoint_state left it: weights, optimizer, scaler, the
    random streams (torch, CUDA, the train loader's), the effort spent and the history;
    returns (start epoch, best accuracy). Checkpoints of the original trainer have no
    scaler, RNG, effort or history entries: those then start afresh. `path` names the
    checkpoint in errors."""
    _load_weights(setup.net, ckpt, path)
    missing = [k for k in ("epoch", "best_acc", "optimizer") if k not in ckpt]
    if missing:
        raise UserError(f"{path} holds no training state (no {', '.join(missing)}): it can be "
                        f"evaluated (--evaluate) but not resumed")
    setup.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler") and setup.scaler.is_enabled():
        setup.scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available() \
            and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "data" in rng:
        setup.train_loader.set_state(rng["data"])
    setup.effort.update(ckpt.get("effort", {}))
    setup.history[:0] = ckpt.get("history", [])
    return ckpt["epoch"], ckpt["best_acc"]


def _load_weights(net, ckpt, path):
    try:
        net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path} does not fit this model (check --dataset, --depth, "
                        f"--block-name, --attention): {e}") from e


# --- log.txt, log.png ---

def _start_log(args, setup, world):
    """Make the folder, print what is trained, note this process in the run's history, and
    start log.txt with its header (a resumed run keeps the log it finds, up to the
    checkpoint's epoch)."""
    os.makedirs(setup.folder, exist_ok=True)
    device = setup.train_loader.device
    setup.history.append({
        "first_epoch": setup.start_epoch + 1, "device": provenance.device_name(device),
        "processes": world, "commit": provenance.commit(), "versions": provenance.versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    print(f"{args.dataset}: {len(setup.train_loader.images)} train, "
          f"{len(setup.test_loader.images)} test images; ResNet-{args.depth} "
          f"{args.block_name} attention={args.attention}, "
          f"{sum(p.numel() for p in setup.net.parameters()) / 1e6:.2f}M parameters; "
          f"{world} process(es) on {setup.train_loader.device.type}; seed {setup.seed}",
          flush=True)
    log = os.path.join(setup.folder, "log.txt")
    if setup.resumed and os.path.isfile(log):
        _cut_log(log, setup.start_epoch)
    else:
        with open(log, "w") as f:
            f.write("\t".join(LOG_COLUMNS) + "\n")


def _cut_log(path, epochs):
    """Keep log.txt's first `epochs` rows: a run stopped after logging an epoch but before
    its checkpoint was written (or in the middle of a row) repeats that epoch when resumed,
    and must log it once."""
    with open(path) as f:
        lines = f.readlines()
    if len(lines) > epochs + 1 or (lines and not lines[-1].endswith("\n")):
        kept = [line for line in lines[:epochs + 1] if line.endswith("\n")]
        replace_atomic(path, lambda f: f.write("".join(kept).encode()))
        print(f"{path}: kept the first {len(kept) - 1} epochs' rows, those of the checkpoint "
              f"(the run had stopped after logging past it)", flush=True)


def _log_epoch(folder, row):
    """Append one epoch's row (the values of LOG_COLUMNS) to log.txt and redraw log.png."""
    log = os.path.join(folder, "log.txt")
    with open(log, "a") as f:
        f.write("\t".join(f"{v:.6f}" for v in row) + "\n")
    plot_log(log, os.path.join(folder, "log.png"))


def read_log(path):
    """{column: [one value per epoch]} from a log.txt; a row cut short (a crash while it was
    written) ends it."""
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        rows = []
        for line in f:
            values = line.rstrip("\n").split("\t")
            try:
                if not line.endswith("\n") or len(values) != len(header):
                    break
                rows.append([float(v) for v in values])
            except ValueError:
                break
    return {name: [r[i] for r in rows] for i, name in enumerate(header)}


def plot_log(log_path, png_path):
    """Loss and accuracy curves of every epoch in log.txt (resumed runs included)."""
    # matplotlib's object API renders PNG with Agg and never touches pyplot's global backend.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = read_log(log_path)
    epochs = range(1, len(columns["Train Loss"]) + 1)
    fig = Figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for name in ("Train Loss", "Classify Loss", "Valid Loss"):
        loss_ax.plot(epochs, columns[name], label=name)
    for name in ("Train Acc.", "Valid Acc."):
        acc_ax.plot(epochs, columns[name], label=name)
    for ax, ylabel in ((loss_ax, "loss"), (acc_ax, "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    replace_atomic(png_path, lambda f: fig.savefig(f, format="png", dpi=100))


# --- processes ---

def _setup_distributed(args):
    """(device, rank, world size) from torchrun's RANK / WORLD_SIZE / LOCAL_RANK, if set.
    Flags that cannot work are UserErrors here, before any process waits for another."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.train_batch % world:
        raise UserError(f"--train-batch {args.train_batch} (the global batch) must divide "
                        f"evenly over {world} processes")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise UserError(f"--device {args.device}: {e}") from e
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank if world > 1 else 0)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {args.device or 'cuda'}: this process would use {device}, "
                            f"but {torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(device)
    _check_cuda_graph(args, device, world)
    if world > 1:
        # torch.distributed.nn binds `group.WORLD` as a default argument when first imported
        # (DistributedDataParallel imports it, through torch._dynamo). Imported after
        # init_process_group, it would hold the group past destroy_process_group (see
        # _teardown); imported now, it binds None.
        import torch.distributed.nn as _  # noqa: F401
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return device, rank, world


def _check_cuda_graph(args, device, world):
    """--cuda-graph with a flag it does not fit is a UserError."""
    why = None if not args.cuda_graph else (
        "it needs a CUDA device" if device.type != "cuda" else
        "runs of several processes (torchrun) are not captured" if world > 1 else
        "--amp fp16's gradient scaler checks for overflow on the host" if args.amp == "fp16"
        else "--compile has CUDA graphs of its own (mode reduce-overhead)" if args.compile
        else None)
    if why:
        raise UserError(f"--cuda-graph: {why}")


def _broadcast(value, world):
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_reduce(tensor, world):
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


def _teardown(world):
    """Destroy the process group. Called once nothing else holds it (the DDP wrapper is
    gone), this frees it: its worker threads end here, while the interpreter is alive.
    A group that outlives this keeps threads that may still be releasing the last
    collective's tensors when the interpreter exits; such a thread, stopped by the exiting
    interpreter in the middle of a C++ destructor, aborts the process ("terminate called
    without an active exception", SIGABRT): a finished run would exit non-zero."""
    if world > 1:
        dist.destroy_process_group()
