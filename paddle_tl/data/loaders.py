"""DataLoaders: shuffled, class-balanced or sharded across data-parallel
processes, with worker counts chosen for the device."""

import os
import shutil

import numpy as np

from paddle_tl.runtime import import_paddle, progress

paddle = import_paddle()


class BalancedBatchSampler(paddle.io.BatchSampler):
    """Batches that draw every class about equally often: indices drawn with
    replacement, each with probability inversely proportional to its class's
    size, as many per epoch as the data has images.

    Data-parallel: every process draws the same sequence (from the number
    given to `set_epoch`, which the trainer sets to seed + epoch) and keeps
    positions rank, rank + N, rank + 2N, ...; the N shards are equally long,
    and batch k of all processes together is batch k of one process with N
    times the batch size."""

    def __init__(self, labels, batch_size, drop_last=False, num_replicas=1, rank=0):
        # No BatchSampler.__init__: it wants a dataset or sampler to wrap, and
        # this draws indices itself (as paddle's DistributedBatchSampler does).
        labels = np.asarray(labels)
        weights = 1.0 / np.bincount(labels)[labels]
        self.probabilities = weights / weights.sum()
        self.batch_size, self.drop_last = batch_size, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = -(-len(labels) // num_replicas)  # per process; ceil, so no image's turn is cut
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        rng = np.random.RandomState(self.epoch)
        drawn = rng.choice(len(self.probabilities), self.num_samples * self.num_replicas, p=self.probabilities)
        mine = drawn[self.rank::self.num_replicas].tolist()
        end = len(mine) - len(mine) % self.batch_size if self.drop_last else len(mine)
        for start in range(0, end, self.batch_size):
            yield mine[start:start + self.batch_size]

    def __len__(self):
        full, partial = divmod(self.num_samples, self.batch_size)
        return full + (1 if partial and not self.drop_last else 0)


def make_loader(dataset, batch_size, shuffle, num_workers, drop_last=False, balanced_labels=None,
                distributed=False, collate_fn=None):
    """A DataLoader; `distributed` gives each data-parallel process its own
    shard (`batch_size` is then per process); `balanced_labels` (the label of
    every sample) draws classes equally often (BalancedBatchSampler).
    `num_workers` is an int or "auto" (loader_settings, for the device paddle
    is set to)."""
    device = "gpu" if paddle.device.get_device().startswith("gpu") else "cpu"
    shm = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
    # paddle.distributed.launch tells each process how many share this machine.
    settings = loader_settings(num_workers, device, _cores(), int(os.environ.get("PADDLE_LOCAL_SIZE", "1")), shm)
    common = dict(settings, return_list=True, collate_fn=collate_fn)
    if balanced_labels is not None:
        shard = (paddle.distributed.get_world_size(), paddle.distributed.get_rank()) if distributed else (1, 0)
        batches = BalancedBatchSampler(balanced_labels, batch_size, drop_last, *shard)
    elif distributed:
        batches = paddle.io.DistributedBatchSampler(dataset, batch_size, shuffle=shuffle, drop_last=drop_last)
    else:
        return paddle.io.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, **common)
    return paddle.io.DataLoader(dataset, batch_sampler=batches, **common)


# DataLoader.*.num_workers=auto. On CPU the model's kernels want the cores,
# and 2 workers deliver several times what training consumes there
# (docs/performance.md). On a GPU they are free: one is left to the training
# process, which feeds the GPU, and up to 8 decode and augment, about 1,700
# ImageNet-sized images/s at the 4.5 ms per image measured here.
CPU_AUTO_WORKERS = 2
GPU_AUTO_MAX_WORKERS = 8
# Workers hand batches over through /dev/shm; containers often give it only
# 64 MB, where paddle's workers die with a bus error, so use pipes there.
SHARED_MEMORY_MIN_FREE = 1 << 30


def loader_settings(num_workers, device, cores, local_processes=1, shm_free=0):
    """paddle.io.DataLoader keyword arguments for `num_workers` (an int, used
    as given, or "auto") on `device` ("cpu"/"gpu"), with `cores` CPU cores
    shared by `local_processes` training processes and `shm_free` bytes free
    in /dev/shm.

    Nothing else needs setting for a GPU: in dynamic-graph mode paddle 3.3's
    loader already stages every batch in pinned memory and copies it to the
    GPU two batches ahead (use_buffer_reader, pin_memory and
    reader_buffer_size default to that). persistent_workers stays off: each
    epoch's workers take their random seeds from the epoch's seed
    (EpochRecorder), which makes a resumed run draw the augmentations of an
    uninterrupted one; persistent workers would carry on from the first
    epoch's draws, and from stale per-epoch dataset state."""
    if num_workers == "auto":
        if device == "gpu":
            num_workers = max(1, min(GPU_AUTO_MAX_WORKERS, cores // local_processes - 1))
        else:
            num_workers = CPU_AUTO_WORKERS
    return {"num_workers": num_workers, "use_shared_memory": num_workers > 0 and shm_free > SHARED_MEMORY_MIN_FREE}


def _cores():
    """The cores this process may run on (a container or taskset may allow
    fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def map_batches(run, loader, desc=None):
    """(outputs, labels) of `run(images)` (a batch tensor -> numpy array) over
    every batch the loader yields, in order: the one loop that runs a network
    over a dataset (evaluation, the report, cached features, the similarity
    probe). `desc` shows progress."""
    outputs, labels = [], []
    batches = progress(loader, desc, unit="batch", leave=False) if desc else loader
    for images, targets in batches:
        outputs.append(run(images))
        labels.append(targets.numpy().reshape(-1))
    return np.concatenate(outputs), np.concatenate(labels)
