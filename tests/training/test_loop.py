"""repro.train.train_minibatch: gradient accumulation equals the whole mini-batch at once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repro.models import build_streaming_resnet, freeze_streamed, unfreeze_streamed
from repro.runtime import make_grad_scaler
from repro.schedule import NonFiniteError
from repro.train import train_minibatch

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: much faster than two on a CPU shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
