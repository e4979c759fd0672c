"""repro.training.loop: gradient accumulation equals the whole mini-batch at once (streamed and
stacked), non-finite losses and gradients stop the step, and the loop's pieces."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from repro.exceptions import NonFiniteError
from repro.methods.streaming import freeze_for_stage
from repro.nn.resnet import build_resnet, build_streaming_resnet, freeze_streamed, unfreeze_streamed
from repro.training.loop import Trainer, train_all, train_minibatch, tuning_metrics
from repro.training.runtime import DistributedContext, Runtime, make_grad_scaler

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # much faster than two on a shared CPU


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it stepped with."""

    def step(self, closure=None):
        self.seen = [p.grad.clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def _model(seed=0, dtype=torch.float64):
    # Streamed up to layer1 (stride 4) so that 64 px images already take 2 x 2 tiles.
    torch.manual_seed(seed)
    model = build_streaming_resnet(
        "resnet18", weights=None, stream_until="layer1", tile_size=96, head_pool="max"
    )
    model = model.to(dtype)
    with torch.no_grad():  # non-trivial frozen batch-norm statistics
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def _items(count=4, size=64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, size, size), generator=generator, dtype=torch.uint8)
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0][:count])
    return (
        [{"image": images[i], "label": labels[i], "image_id": f"img{i}"} for i in range(count)],
        images,
        labels,
    )


@pytest.mark.parametrize("stage", [1, 2])
def test_accumulated_gradient_and_step_equal_the_whole_minibatch(stage):
    items, images, labels = _items()
    streamed, reference = _model(), _model()
    for model in (streamed, reference):
        (freeze_streamed if stage == 1 else unfreeze_streamed)(model)
    assert streamed.streamed.plan((1, 3, 64, 64)).tiles.__len__() == 4  # really streamed

    trainable = [p for p in streamed.parameters() if p.requires_grad]
    optimizer = RecordingSGD(trainable, lr=0.1, momentum=0.9)
    results = train_minibatch(
        streamed, items, optimizer, make_grad_scaler(CPU, False), device=CPU, images_in_step=4
    )

    # Reference: the same network without streaming, the 4 images in one batch, mean loss.
    net = nn.Sequential(reference.streamed.module, reference.head)
    ref_trainable = [p for p in reference.parameters() if p.requires_grad]
    ref_optimizer = torch.optim.SGD(ref_trainable, lr=0.1, momentum=0.9)
    logits = net(images.double() / 255).squeeze(1)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.double())
    loss.backward()
    ref_grads = [p.grad.clone() for p in ref_trainable]
    ref_optimizer.step()

    assert len(optimizer.seen) == len(ref_grads)
    if stage == 1:  # only the head (layer4 + fc) trains; the streamed part has no gradients
        assert all(p.grad is None for p in streamed.streamed.parameters())
        assert len(trainable) == len(list(streamed.head.parameters()))
    for got, expected in zip(optimizer.seen, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    for got, expected in zip(streamed.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    per_image = nn.functional.binary_cross_entropy_with_logits(
        logits.detach(), labels.double(), reduction="none"
    )
    torch.testing.assert_close(torch.tensor([r[1] for r in results]).double(), per_image)
    assert [r[0] for r in results] == ["img0", "img1", "img2", "img3"]
    assert all(p.grad is None for p in trainable)  # cleared for the next mini-batch


def test_two_steps_with_momentum_match_the_reference():
    items, images, labels = _items(count=4)
    streamed, reference = _model(), _model()
    optimizer = torch.optim.SGD(streamed.parameters(), lr=0.05, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    net = nn.Sequential(reference.streamed.module, reference.head)
    scaler = make_grad_scaler(CPU, False)
    for step in range(2):
        chunk = slice(2 * step, 2 * step + 2)
        train_minibatch(streamed, items[chunk], optimizer, scaler, device=CPU, images_in_step=2)
        logits = net(images[chunk].double() / 255).squeeze(1)
        nn.functional.binary_cross_entropy_with_logits(logits, labels[chunk].double()).backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
    for got, expected in zip(streamed.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_nonfinite_loss_names_the_image_and_takes_no_step():
    items, _, _ = _items(count=2, size=32)
    model = _model(dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    items[1]["label"] = torch.tensor(float("nan"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        NonFiniteError, match=r"stage 1 epoch 3: non-finite loss for image\(s\) img1"
    ):
        train_minibatch(
            model,
            items,
            optimizer,
            make_grad_scaler(CPU, False),
            device=CPU,
            images_in_step=2,
            where="stage 1 epoch 3",
        )
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_nonfinite_gradient_is_caught_before_the_step():
    items, _, _ = _items(count=2, size=32)
    model = _model(dtype=torch.float32)
    model.head.fc.weight.register_hook(lambda grad: grad * float("inf"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.head.fc.weight.detach().clone()
    with pytest.raises(NonFiniteError, match=r"non-finite gradient.*img0, img1"):
        train_minibatch(
            model, items, optimizer, make_grad_scaler(CPU, False), device=CPU, images_in_step=2
        )
    assert torch.equal(model.head.fc.weight.detach(), before)


def test_stacked_minibatch_step_equals_image_by_image():
    torch.manual_seed(0)
    items = [
        {"image": torch.randint(0, 255, (3, 48, 48), dtype=torch.uint8), "label": float(i % 2),
         "image_id": f"p{i}"}
        for i in range(5)
    ]  # fmt: skip
    weights = []
    for stack in (False, True):
        torch.manual_seed(1)
        model = build_resnet("resnet18").train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        results = train_minibatch(
            model, items, optimizer, scaler, device=torch.device("cpu"), images_in_step=5,
            stack=stack,
        )  # fmt: skip
        assert [r[0] for r in results] == [item["image_id"] for item in items]
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


def test_tuning_metrics_from_logits_or_probabilities():
    frame = pd.DataFrame({"label": [0, 0, 1, 1], "logit": [-2.0, 0.5, 1.0, 3.0]})
    metrics = tuning_metrics(frame)
    logits, labels = torch.tensor(frame["logit"]), torch.tensor(frame["label"]).double()
    expected = nn.functional.binary_cross_entropy_with_logits(logits, labels).item()
    assert metrics["tune_loss"] == pytest.approx(expected, rel=1e-12)
    assert metrics["tune_accuracy"] == 0.75  # logit 0.5 of a negative is wrong
    assert metrics["tune_auc"] == 1.0
    scores = frame.assign(score=torch.sigmoid(logits).numpy()).drop(columns="logit")
    assert tuning_metrics(scores) == pytest.approx(metrics, rel=1e-9)
    one_class = tuning_metrics(frame.assign(label=1))
    assert math.isnan(one_class["tune_auc"])


class _NoData:
    stack = False


def test_trainer_rejects_a_batch_not_shared_by_the_ranks_and_unknown_optimizers():
    model = nn.Linear(2, 1)
    two = Runtime(context=DistributedContext(rank=0, world_size=2))
    with pytest.raises(ValueError, match=r"batch_size=3 must be a multiple .* \(2\)"):
        Trainer(model, _NoData(), batch_size=3, runtime=two)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Trainer(model, _NoData(), batch_size=2, optimizer="lbfgs")


def test_begin_stage_applies_the_freeze_policy_and_a_fresh_optimizer():
    model = _model(dtype=torch.float32)
    trainer = Trainer(model, _NoData(), batch_size=2, optimizer="adam", freeze=freeze_for_stage)
    trainer.begin_stage(1, 1e-3)
    head = {id(p) for p in model.head.parameters()}
    stage1 = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    assert {id(p) for p in stage1} == head  # the streamed part frozen
    trainer.begin_stage(2, 1e-4)
    stage2 = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert len(stage2) == len(list(model.parameters()))
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-4
    train_all(model, 1)
    assert all(p.requires_grad for p in model.parameters())
