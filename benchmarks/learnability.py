"""How much of a synthetic task's label random frozen features carry, layer by layer.

Stage 1 of the streaming schedule trains only the head on the frozen streamed part (the paper's
split: layer4 and the classifier on conv1..layer3; the demo's: layer3 onward on conv1..layer2);
from random initialisation that part is a random feature extractor, so what its features carry
bounds what stage 1 can learn. For each task this draws ``--images`` biopsies at 0.96 um/px
(:func:`repro.data.synthetic.render_case`), runs the demo's network (a randomly initialised
ResNet-18; input normalisation and batch norm estimated from the first 8 images, where the
pipeline takes its normalisation from the whole training split) over the whole images, max-pools
each stage's output over the image (the head's global max pooling), and scores a 5-fold
cross-validated, strongly regularised logistic regression on those features (ROC AUC).

Read the table as: plain's label is in every layer (colour); a task whose AUC falls with depth
is learnable from early features but not by stage 1 on random ones.

Example::

    python benchmarks/learnability.py --images 240 --width 768
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from repro.config import SYNTHETIC_TASKS
from repro.data.synthetic import render_case, synthetic_cases
from repro.nn.resnet import build_streaming_resnet, calibrate_batchnorm

STAGES = ("layer1", "layer2", "layer3", "layer4")
CALIBRATION_IMAGES = 8


def draw_task(task: str, n_images: int, width: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``n_images`` biopsies of ``task`` (uint8, N x 3 x width/2 x width) and their labels."""
    images, labels = [], []
    for case in tqdm(synthetic_cases(n_images, seed), desc=f"draw {task}", unit="image"):
        rng = np.random.default_rng([seed, case.index])
        pixels, _ = render_case(rng, width, width // 2, case.primary, case.secondary, task)
        images.append(torch.from_numpy(pixels).permute(2, 0, 1))
        labels.append(int(case.primary > 0))
    return torch.stack(images), np.array(labels)


@torch.no_grad()
def pooled_features(images: torch.Tensor, arch: str, seed: int) -> dict[str, np.ndarray]:
    """Each stage's output of a random ``arch``, max-pooled over the image, per image."""
    torch.manual_seed(seed)
    model = build_streaming_resnet(arch, weights=None, tile_size=images.shape[-1])
    unit = images[:CALIBRATION_IMAGES].float() / 255
    model.streamed.module.normalize.set_stats(unit.mean((0, 2, 3)), unit.std((0, 2, 3)))
    calibrate_batchnorm(model, [image[None] for image in unit])
    model.eval()
    layers = dict(model.streamed.module.named_children()) | dict(model.head.named_children())
    features: dict[str, list[torch.Tensor]] = {stage: [] for stage in STAGES}
    for image in tqdm(images, desc="features", unit="image", leave=False):
        x = image[None].float() / 255
        for name, layer in layers.items():
            if name == "pool":
                break
            x = layer(x)
            if name in features:
                features[name].append(x.amax(dim=(2, 3))[0])
    return {stage: torch.stack(rows).numpy() for stage, rows in features.items()}


def probe_auc(features: np.ndarray, labels: np.ndarray) -> float:
    """5-fold cross-validated ROC AUC of a logistic regression (C = 0.01) on ``features``."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=5000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    scores = cross_val_predict(model, features, labels, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, scores))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(SYNTHETIC_TASKS))
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--width", type=int, default=768, help="px at 0.96 um/px (demo: 768)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/learnability.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for task in args.tasks:
        start = time.perf_counter()
        images, labels = draw_task(task, args.images, args.width, args.seed)
        features = pooled_features(images, args.arch, args.seed)
        aucs = {stage: probe_auc(features[stage], labels) for stage in STAGES}
        rows.append(
            {"task": task, "images": args.images, "positives": int(labels.sum()), **aucs,
             "seconds": round(time.perf_counter() - start, 1)}
        )  # fmt: skip
    print(f"random frozen {args.arch}, max-pooled, logistic-regression probe (5-fold ROC AUC)")
    print(f"{'task':<9}" + "".join(f"{stage:>9}" for stage in STAGES))
    for row in rows:
        print(f"{row['task']:<9}" + "".join(f"{row[stage]:>9.3f}" for stage in STAGES))
    result = {
        "benchmark": "learnability",
        "arch": args.arch,
        "width": args.width,
        "seed": args.seed,
        "machine": platform.platform(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
