"""repro.training.schedule: the two-stage schedule with a toy method (tiny model, in-memory
data); the loss curves of its run folder (repro.reporting.curves)."""

from __future__ import annotations

import csv
import json

import matplotlib
import pytest
import torch

from repro.exceptions import CheckpointError, NonFiniteError
from repro.io.checkpoints import load_checkpoint
from repro.layout import MethodLayout
from repro.reporting.curves import plot_loss_curves, save_loss_curves
from repro.training.schedule import EpochRun, ScheduleSettings, run_schedule
from repro.training.selection import average_state_dicts

matplotlib.use("Agg")


class KilledError(Exception):
    """Stands in for a kill at a chosen point."""


class ToyTrainer:
    """Logistic regression, two samples per optimiser step; stage 1 trains only the bias."""

    def __init__(self, seed=0, interrupt_at=None, poison_at=None):
        generator = torch.Generator().manual_seed(123)
        self.x = torch.randn(24, 3, generator=generator, dtype=torch.float64)
        self.y = (self.x[:, 0] + 0.5 * self.x[:, 1] > 0).double()
        self.tune_x = torch.randn(12, 3, generator=generator, dtype=torch.float64)
        self.tune_y = (self.tune_x[:, 0] + 0.5 * self.tune_x[:, 1] > 0).double()
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(3, 1).double()
        self.interrupt_at = interrupt_at
        self.poison_at = poison_at
        self.optimizer = None
        self.stages = []

    def begin_stage(self, stage, lr):
        self.stages.append(stage)
        self.model.weight.requires_grad_(stage == 2)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=lr, momentum=0.9)

    def train_epoch(self, run: EpochRun):
        order = torch.randperm(24, generator=torch.Generator().manual_seed(run.global_epoch))
        position = run.resume["position"] if run.resume else 0
        total = run.resume["total"] if run.resume else 0.0
        loss_fn = torch.nn.BCEWithLogitsLoss()
        for start in range(position, 24, 2):
            index = order[start : start + 2]
            # global RNG use that the schedule must restore on resume
            noise = 1e-3 * torch.randn(2, 3, dtype=torch.float64)
            loss = loss_fn(self.model(self.x[index] + noise).squeeze(1), self.y[index])
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += loss.item()
            if self.poison_at == (run.stage, run.epoch):
                with torch.no_grad():
                    self.model.bias.fill_(float("nan"))
            steps = start // 2 + 1
            if self.interrupt_at == (run.stage, run.epoch, steps):
                raise KilledError
            run.step_done(steps, lambda s=start, t=total: {"position": s + 2, "total": t})
        return {"train_loss": total / 12}

    def evaluate(self, run):
        with torch.no_grad():
            logits = self.model(self.tune_x).squeeze(1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, self.tune_y)
        return {
            "tune_loss": loss.item(),
            "tune_accuracy": ((logits > 0) == self.tune_y).float().mean(),
        }

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])


SETTINGS = ScheduleSettings(lr=0.05, epochs=4, stage2_lr=0.02, stage2_epochs=5, window=3)


def _final_weights(out):
    return load_checkpoint(MethodLayout(out).final)["model"]


def test_schedule_writes_the_run_dir_and_averages_the_best_window(tmp_path):
    trainer = ToyTrainer()
    result = run_schedule(trainer, SETTINGS, tmp_path, metadata={"arch": "toy"})
    files = MethodLayout(tmp_path)
    assert trainer.stages == [1, 2]
    names = sorted(p.name for p in files.checkpoints.iterdir())
    assert names == [files.checkpoint(1, e).name for e in range(1, 5)] + [
        files.checkpoint(2, e).name for e in range(1, 6)
    ]
    assert sorted(files.epoch_checkpoints()) == [
        (1, e, files.checkpoint(1, e)) for e in range(1, 5)
    ] + [(2, e, files.checkpoint(2, e)) for e in range(1, 6)]
    with open(files.metrics) as stream:
        rows = list(csv.DictReader(stream))
    assert [(int(r["stage"]), int(r["epoch"]), int(r["global_epoch"])) for r in rows] == [
        (1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 4, 4),
        (2, 1, 5), (2, 2, 6), (2, 3, 7), (2, 4, 8), (2, 5, 9),
    ]  # fmt: skip
    assert {"train_loss", "tune_loss", "tune_accuracy", "lr"} <= set(rows[0])

    selection = json.loads(files.selection.read_text())
    assert selection == result.selection
    stage1, stage2 = selection["stages"]["1"], selection["stages"]["2"]
    losses1 = [float(r["tune_loss"]) for r in rows[:4]]
    means = [sum(losses1[i : i + 3]) / 3 for i in range(2)]
    best = means.index(min(means))
    assert stage1["epochs"] == [best + 1, best + 2, best + 3]
    assert stage1["middle_epoch"] == best + 2
    assert stage1["checkpoint"] == files.checkpoint(1, best + 2).relative_to(tmp_path).as_posix()
    assert "middle checkpoint" in stage1["reason"]
    assert len(stage2["epochs"]) == 3 and stage2["averaged_checkpoints"]
    assert selection["final"] == {"stage": 2, "epochs": stage2["epochs"]}

    expected = average_state_dicts([files.checkpoint(2, e) for e in stage2["epochs"]])
    final = load_checkpoint(files.final)
    assert final["metadata"] == {"arch": "toy"}
    for name, value in expected.items():
        assert torch.equal(final["model"][name], value)
        assert torch.equal(trainer.model.state_dict()[name], value)


def test_stage_two_starts_from_the_middle_checkpoint(tmp_path):
    settings = ScheduleSettings(lr=0.05, epochs=4, stage2_lr=1e-12, stage2_epochs=1, window=3)
    run_schedule(ToyTrainer(), settings, tmp_path)
    files = MethodLayout(tmp_path)
    middle = json.loads(files.selection.read_text())["stages"]["1"]["middle_epoch"]
    start = load_checkpoint(files.checkpoint(1, middle))["model"]
    torch.testing.assert_close(_final_weights(tmp_path), start, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "interrupt_at",
    [(1, 2, 3), (1, 4, 12), (2, 1, 1), (2, 3, 7), (2, 5, 12)],
    ids=["stage1-mid", "stage1-end", "stage2-first-step", "stage2-mid", "last-step"],
)
@pytest.mark.parametrize("checkpoint_every", [0, 2])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, interrupt_at, checkpoint_every):
    settings = ScheduleSettings(**{**SETTINGS.__dict__, "checkpoint_every": checkpoint_every})
    reference = tmp_path / "reference"
    run_schedule(ToyTrainer(), settings, reference)

    resumed = tmp_path / "resumed"
    files = MethodLayout(resumed)
    with pytest.raises(KilledError):
        run_schedule(ToyTrainer(interrupt_at=interrupt_at), settings, resumed)
    assert not files.final.exists()
    assert files.last_checkpoint.exists() == (checkpoint_every > 0 and interrupt_at[2] >= 2)
    torch.manual_seed(999)  # a restarted process has other global RNG states
    run_schedule(ToyTrainer(), settings, resumed)

    for name, value in _final_weights(reference).items():
        assert torch.equal(_final_weights(resumed)[name], value), name
    assert MethodLayout(reference).metrics.read_text() == files.metrics.read_text()
    assert not files.last_checkpoint.exists()


def test_rerunning_a_finished_run_changes_nothing(tmp_path):
    run_schedule(ToyTrainer(), SETTINGS, tmp_path)
    before = _final_weights(tmp_path)
    trainer = ToyTrainer()
    run_schedule(trainer, SETTINGS, tmp_path)
    assert trainer.stages == [2]  # resumed at the end of stage 2: nothing left to train
    for name, value in before.items():
        assert torch.equal(_final_weights(tmp_path)[name], value)


def test_resume_with_other_settings_is_refused(tmp_path):
    run_schedule(ToyTrainer(), SETTINGS, tmp_path)
    other = ScheduleSettings(**{**SETTINGS.__dict__, "lr": 0.1})
    with pytest.raises(CheckpointError, match="same params"):
        run_schedule(ToyTrainer(), other, tmp_path)


def test_nonfinite_weights_stop_before_a_checkpoint_is_written(tmp_path):
    with pytest.raises(NonFiniteError, match="stage 1 epoch 2"):
        run_schedule(ToyTrainer(poison_at=(1, 2)), SETTINGS, tmp_path)
    files = MethodLayout(tmp_path)
    assert sorted(files.checkpoints.iterdir()) == [files.checkpoint(1, 1)]


def test_short_runs_shorten_the_window_and_stage_one_only_runs_average_stage_one(tmp_path):
    settings = ScheduleSettings(lr=0.05, epochs=2, stage2_lr=0.01, stage2_epochs=0, window=5)
    result = run_schedule(ToyTrainer(), settings, tmp_path)
    assert result.selection["final"] == {"stage": 1, "epochs": [1, 2]}
    assert "shortened" in result.selection["stages"]["1"]["note"]


def test_loss_curve_plot_marks_the_windows(tmp_path):
    run_schedule(ToyTrainer(), SETTINGS, tmp_path)
    files = MethodLayout(tmp_path)
    figure = save_loss_curves(files)
    assert files.loss_curves.stat().st_size > 1000
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert any("stage 1: picked window" in label for label in labels)
    assert any("stage 2: averaged" in label for label in labels)
    assert "stage 2 starts here" in labels
    plot_loss_curves(files.metrics)  # without a selection


def test_describe_selection_mentions_both_stages(tmp_path):
    from repro.training.schedule import describe_selection

    result = run_schedule(ToyTrainer(), SETTINGS, tmp_path)
    text = describe_selection(result.selection)
    assert "stage 1: epochs" in text and "stage 2: epochs" in text
    assert "middle checkpoint" in text and "mean of the weights" in text
