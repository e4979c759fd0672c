"""Tiny streaming-training jobs for the trainer tests, run in child processes.

Not a test module: ``tests/training/test_train_resume.py`` runs it under SIGKILL and restarts it,
``tests/training/test_train_distributed.py`` runs it under ``torch.distributed.run``. The data are
small in-memory images (positives carry a dark blob) and the network is a ResNet-18 streamed up to
layer1 (64 px images take 2 x 2 tiles), so a whole two-stage run takes seconds on a CPU, through
the real :class:`repro.training.loop.Trainer` with the streaming method's data side
(:class:`repro.methods.streaming.WholeBiopsies`, :func:`repro.methods.streaming.freeze_for_stage`),
:func:`repro.training.schedule.run_schedule`, checkpoints and
:class:`repro.data.sampling.BalancedSampler`.

Usage::

    python tests/training/train_child.py schedule OUT_DIR [--kill-at-step N] [--kill-in-save N]
        [--checkpoint-every N]
    python tests/training/train_child.py one-step OUT_FILE   (under torch.distributed.run or alone)
"""

from __future__ import annotations

import argparse
import os
import signal

import numpy as np
import torch

from repro.data.sampling import BalancedSampler
from repro.io import atomic
from repro.methods.streaming import WholeBiopsies, freeze_for_stage
from repro.nn.resnet import build_streaming_resnet
from repro.training import loop
from repro.training.loop import Trainer
from repro.training.runtime import (
    Runtime,
    init_distributed,
    seed_everything,
    shutdown_distributed,
)
from repro.training.schedule import EpochRun, ScheduleSettings, run_schedule

SIZE = 64
LABELS = [1, 0, 1, 1, 0, 1, 0, 1, 1, 0]  # 6 positives, 4 negatives: negatives oversampled
TUNE_LABELS = [1, 0, 1, 0]
SETTINGS = ScheduleSettings(lr=0.02, epochs=2, stage2_lr=0.01, stage2_epochs=2, window=2)


class TinyBiopsies(torch.utils.data.Dataset):
    """uint8 noise images; positives have a dark square; epoch-seeded flips as augmentation."""

    def __init__(self, labels, seed=0, augment=True):
        self.labels = list(labels)
        self.seed, self.augment, self.epoch = seed, augment, 0

    def __len__(self):
        return len(self.labels)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, index])
        image = rng.integers(120, 255, (3, SIZE, SIZE), dtype=np.uint8)
        if self.labels[index]:
            y, x = rng.integers(0, SIZE - 12, 2)
            image[:, y : y + 12, x : x + 12] //= 4
        if self.augment:
            flips = np.random.default_rng([self.seed, self.epoch, index]).integers(0, 2, 2)
            image = image[:, :: 1 - 2 * flips[0], :: 1 - 2 * flips[1]]
        return {
            "image": torch.from_numpy(image.copy()),
            "label": torch.tensor(float(self.labels[index])),
            "image_id": f"tiny{index:02d}",
        }


def tiny_model(seed=0, dtype=torch.float32):
    seed_everything(seed)
    model = build_streaming_resnet(
        "resnet18", weights=None, stream_until="layer1", tile_size=96, head_pool="max"
    )
    return model.to(dtype)


def make_trainer(context=None, batch_size=4, dtype=torch.float32, seed=0):
    model = tiny_model(seed, dtype)
    rank, world = (context.rank, context.world_size) if context else (0, 1)
    sampler = BalancedSampler(LABELS, seed=seed, num_replicas=world, rank=rank)
    runtime = Runtime(context=context, progress=False) if context else Runtime(progress=False)
    data = WholeBiopsies(
        TinyBiopsies(LABELS, seed),
        TinyBiopsies(TUNE_LABELS, seed + 1, augment=False),
        sampler,
        runtime=runtime,
        seed=seed,
    )
    return Trainer(
        model,
        data,
        batch_size=batch_size,
        momentum=0.9,
        freeze=freeze_for_stage,
        runtime=runtime,
    )


def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def run_schedule_job(out_dir, kill_at_step=None, kill_in_save=None, checkpoint_every=1):
    """The whole two-stage schedule; optionally SIGKILL ourselves at the N-th optimiser step
    (before it is taken) or inside the N-th checkpoint write (temporary file written, not yet
    renamed)."""
    if kill_at_step is not None:
        original_step = loop.train_minibatch
        calls = {"n": 0}

        def counting_step(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == kill_at_step:
                _kill_self()
            return original_step(*args, **kwargs)

        loop.train_minibatch = counting_step
    if kill_in_save is not None:
        original_replace = os.replace
        saves = {"n": 0}

        def dying_replace(source, target):
            if str(target).endswith(".pt"):
                saves["n"] += 1
                if saves["n"] == kill_in_save:
                    _kill_self()
            return original_replace(source, target)

        atomic.os.replace = dying_replace
    trainer = make_trainer()
    settings = ScheduleSettings(**{**SETTINGS.__dict__, "checkpoint_every": checkpoint_every})
    run_schedule(trainer, settings, out_dir)


def one_step_job(out_file, batch_size):
    """One optimiser step (stage 2, every weight trains) on one mini-batch; rank 0 saves."""
    context = init_distributed("cpu")
    try:
        trainer = make_trainer(context, batch_size=batch_size, dtype=torch.float64)
        trainer.epoch_images = batch_size  # exactly one mini-batch
        trainer.begin_stage(2, 0.05)
        metrics = trainer.train_epoch(EpochRun(stage=2, epoch=1, global_epoch=1, lr=0.05))
        tune = trainer.evaluate()
        if context.is_main:
            torch.save(
                {
                    "model": trainer.model.state_dict(),
                    "metrics": metrics,
                    "tune": tune,
                    "world_size": context.world_size,
                },
                out_file,
            )
    finally:
        shutdown_distributed()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=["schedule", "one-step"])
    parser.add_argument("out")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-in-save", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--checkpoint-every", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.job == "schedule":
        run_schedule_job(args.out, args.kill_at_step, args.kill_in_save, args.checkpoint_every)
    else:
        one_step_job(args.out, args.batch_size)


if __name__ == "__main__":
    main()
