"""Experiment settings: typed sections whose defaults are the paper's values.

One experiment is one YAML file in ``params/``. Its top-level keys are ``experiment`` and the
section names below; each section holds the keys of its dataclass. :func:`load_params` reads a
file over the defaults and validates it; every problem is reported in one :class:`ParamsError`
that names the file and the key path (with the closest valid key for a typo).

Values the paper does not give are marked *our choice* in the field comments. String values may
use ``${VAR}`` or ``${VAR:-default}`` to read an environment variable (e.g. the PANDA location).
Relative paths are relative to the project root, so notebooks and the command line agree.

Notebooks receive the same keys from papermill (``-f params/X.yaml`` injects one variable per
top-level key) and pass them to :func:`repro.pipeline.notebook.from_notebook`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from repro.exceptions import ParamsError
from repro.layout import PandaLayout, PreparedLayout, RunLayout

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS_FILE = PROJECT_ROOT / "params" / "demo.yaml"

STREAM_STRIDE = {"layer2": 8, "layer3": 16, "layer4.0": 32}
"""Total stride of the streamed part of a ResNet, by the last streamed layer."""

SyntheticTask = Literal["plain", "local", "context"]
SYNTHETIC_TASKS: tuple[str, ...] = typing.get_args(SyntheticTask)
"""What separates the classes of the synthetic set (:mod:`repro.data.synthetic`)."""


@dataclass
class RunSettings:
    """Where outputs go and what hardware runs them."""

    out_dir: str = "runs"  # runs/<experiment>/ holds everything an experiment produces
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # our choice
    num_workers: int = 4  # data-loading / preparation worker processes (our choice)
    mixed_precision: bool = True  # autocast + GradScaler, used only on CUDA (authors' code)
    channels_last: bool = True  # used only on CUDA
    torch_threads: int = 0  # CPU threads per process for torch; 0 = torch's default (our choice)


@dataclass
class DataSettings:
    """Raw slides, preparation (paper III, IV-A) and the synthetic stand-in for PANDA."""

    source: Literal["panda", "synthetic", "csv"] = "panda"  # csv: your own slides, see csv_path
    panda_dir: str = "${PANDA_DIR:-data/panda}"  # holds train.csv and train_images/
    csv_path: str | None = None  # source csv: slide, label[, patient_id, split, mpp] per row
    slide_backend: Literal["auto", "pyvips", "openslide"] = "auto"  # auto: chosen per file
    prepared_dir: str = "data/prepared/panda"  # shared by every experiment on this dataset
    data_provider: str = "radboud"  # PANDA provider kept; "all" keeps both
    target_mpp: float = 0.96  # um/px of the prepared images (paper: ~100x magnification)
    mpp_override: float | None = None  # level-0 um/px for files without resolution tags
    input_size: int = 16384  # pad / centre-crop to this square size (paper)
    tissue_saturation: float = 0.07  # HSV saturation above which a pixel is tissue (our choice)
    tissue_min_object_px: int = 64  # smaller tissue specks are removed, at 1/32 scale (our choice)
    tissue_downsample: int = 32  # tissue mask at 1/32 of target_mpp (authors' code; our choice)
    synthetic_images: int = 0  # synthetic set only: number of biopsies generated
    synthetic_size: int = 2048  # synthetic set only: level-0 width of a generated slide (px)
    # synthetic set only: plain (tumour is the only dark tissue), local (benign mimics: only
    # morphology separates the classes) or context (two foci apart vs fused). Default plain,
    # the generator before issue 13, until the demo's training learns the local task.
    synthetic_task: SyntheticTask = "plain"


@dataclass
class SplitSettings:
    """Train/tune/test split and the Table I subsets."""

    tune_fraction: float = 497 / 5744  # paper's proportions (our choice: PANDA has no split)
    test_fraction: float = 535 / 5744
    subset_size: int | None = None  # None = whole training set; 500 = 10%, 250 = 5% (Table I)
    subset_negative_fraction: float = 0.5  # half negatives (Table I)


@dataclass
class AugmentationSettings:
    """pyvips augmentation (paper IV-A). Magnitudes are our choice: the paper gives none."""

    enabled: bool = True
    flips: bool = True  # random horizontal and vertical flips
    rotate_90: bool = True  # random multiples of 90 degrees
    rotation_degrees: float = 10.0  # extra random rotation in [-x, x] (our choice)
    elastic_alpha: float = 40.0  # elastic displacement magnitude in px (our choice)
    elastic_sigma: float = 60.0  # smoothness of the displacement field in px (our choice)
    hue: float = 0.05  # +-5% hue shift (authors' code: ~5% in LCh)
    saturation: float = 0.05  # +-5% chroma scale
    brightness: float = 0.05  # +-5% lightness scale


@dataclass
class StreamingSettings:
    """The end-to-end streamed ResNet (paper IV-A2)."""

    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet34"
    weights: str | None = "imagenet"  # "imagenet", a path to a state_dict, or null (random)
    stream_until: Literal["layer2", "layer3", "layer4.0"] = "layer3"  # paper: first 28 layers
    tile_size: int = 2800  # paper; must be a multiple of the streamed part's stride
    memory_budget_gb: float | None = None  # if set, the tile size is planned from this budget
    head_pool: Literal["max", "avg"] = "max"  # global max pooling (authors' code)
    standardize_pooled: bool = False  # our choice for random init: see nn.resnet.PooledStandardize


@dataclass
class TrainSettings:
    """Two-stage streaming schedule (paper IV-A)."""

    batch_size: int = 16  # effective mini-batch by gradient accumulation
    momentum: float = 0.9
    lr: float = 2e-4  # stage 1: streamed part frozen
    epochs: int = 25  # stage 1
    stage2_lr: float = 6e-5  # stage 2: whole network
    stage2_epochs: int = 50
    window: int = 5  # moving average of the tuning loss over this many epochs
    oversample_negatives: bool = True
    calibrate_batchnorm_images: int = 0  # >0: estimate frozen-BN stats from this many images
    checkpoint_every: int = 25  # also save checkpoints/last.pt every N optimiser steps (our choice)
    optimizer: Literal["sgd", "adam"] = "sgd"  # paper: SGD; adam: our choice for CPU demos
    epoch_images: int | None = None  # None: the sampler's whole epoch; N: its first N (CPU demos)


@dataclass
class MILSettings:
    """Campanella-style top-1 multiple-instance-learning baseline (paper IV-B)."""

    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet34"
    weights: str | None = "imagenet"
    patch_size: int = 224  # px at target_mpp (our choice: the paper does not state it)
    patch_stride: int = 224  # our choice
    min_tissue_fraction: float = 0.1  # patches with less tissue are skipped (our choice)
    batch_size: int = 16
    inference_batch_size: int = 64  # our choice
    momentum: float = 0.9
    lr: float = 1e-5
    epochs: int = 100
    stage2_lr: float = 3e-6
    stage2_epochs: int = 100
    window: int = 5
    oversample_negatives: bool = True
    calibrate_batchnorm_images: int = 0  # >0: frozen-BN stats from all patches of this many images
    standardize_pooled: bool = False  # our choice for random init: see nn.resnet.PooledStandardize
    optimizer: Literal["sgd", "adam"] = "sgd"  # paper: SGD; adam: our choice for CPU demos


@dataclass
class EvaluationSettings:
    """Evaluation and figures (paper IV-C, IV-D)."""

    n_bootstrap: int = 10000
    smoothgrad_samples: int = 25
    smoothgrad_noise: float = 0.05  # noise std as a fraction of the image-wide std
    heatmap_examples: int = 3  # correct predictions shown in the Fig. 6 equivalent (our choice)
    heatmap_size: int = 1024  # longest side (px) of thumbnails and heatmaps (our choice)
    figures_dir: str = "figures"
    labels_dir: str = "labels"  # manual error labels, <labels_dir>/<experiment>.csv (our choice)


@dataclass
class Params:
    """All settings of one experiment."""

    experiment: str = "demo"
    run: RunSettings = field(default_factory=RunSettings)
    data: DataSettings = field(default_factory=DataSettings)
    splits: SplitSettings = field(default_factory=SplitSettings)
    augmentation: AugmentationSettings = field(default_factory=AugmentationSettings)
    streaming: StreamingSettings = field(default_factory=StreamingSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    mil: MILSettings = field(default_factory=MILSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)

    @property
    def run_dir(self) -> Path:
        """``<out_dir>/<experiment>``: everything this experiment writes."""
        return resolve_path(self.run.out_dir) / self.experiment

    @property
    def layout(self) -> RunLayout:
        """The files of :attr:`run_dir` (:class:`repro.layout.RunLayout`)."""
        return RunLayout(self.run_dir)

    @property
    def prepared(self) -> PreparedLayout:
        """The files of ``data.prepared_dir`` (:class:`repro.layout.PreparedLayout`)."""
        return PreparedLayout(resolve_path(self.data.prepared_dir))

    @property
    def panda(self) -> PandaLayout:
        """The raw files of ``data.panda_dir`` (:class:`repro.layout.PandaLayout`)."""
        return PandaLayout(resolve_path(expand_env(self.data.panda_dir)))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, suitable for ``yaml.safe_dump`` (e.g. the resolved params.yaml)."""
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Params)
    if f.name != "experiment"
}
TOP_LEVEL_KEYS = ("experiment", *SECTIONS)

_YAML11_EXPONENT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")
_ENV_PATTERN = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def resolve_path(value: str | os.PathLike[str]) -> Path:
    """An absolute path; relative ones are taken relative to the project root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def load_params(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Params:
    """Read a params YAML over the paper defaults and validate it.

    A file may start from another with ``base: params/demo.yaml`` (relative to the project root);
    its own values then override the base file's, key by key.

    Args:
        path: the YAML file (e.g. ``params/5pct.yaml``).
        overrides: nested values applied on top of the file (same shape as the YAML).

    Raises:
        ParamsError: naming the file and every offending key path.
    """
    values = _deep_merge(_read_yaml(Path(path)), overrides or {})
    return build_params(values, source=str(path))


def _read_yaml(source: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's mapping, merged over its ``base`` file's (recursively)."""
    try:
        text = source.read_text()
    except OSError as error:
        raise ParamsError(f"{source}: cannot read params file ({error.strerror})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ParamsError(f"{source}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ParamsError(f"{source}: base: expected a params file path, got {base!r}")
    base_path = resolve_path(base)
    if base_path.resolve() in seen or base_path.resolve() == source.resolve():
        raise ParamsError(f"{source}: base: {base} extends itself in a cycle")
    return _deep_merge(_read_yaml(base_path, (*seen, source.resolve())), raw)


def build_params(values: dict[str, Any], source: str = "<params>") -> Params:
    """Validate a nested dict (top-level keys: experiment and the sections) into :class:`Params`."""
    errors: list[str] = []
    params = Params()
    for key, value in values.items():
        if key == "experiment":
            if not isinstance(value, str) or not _NAME_PATTERN.match(value):
                errors.append(f"experiment: must be a name like '5pct', got {value!r}")
            else:
                params.experiment = value
        elif key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                errors.append(f"{key}: must be a mapping, got {type(value).__name__}")
                continue
            setattr(params, key, _build_section(SECTIONS[key], value, key, errors))
        else:
            errors.append(unknown_key(key, TOP_LEVEL_KEYS, ""))
    if not errors:
        errors.extend(_check_values(params))
    if errors:
        details = "\n  ".join(errors)
        raise ParamsError(f"{source}: invalid params:\n  {details}")
    return params


def check_data_paths(params: Params) -> None:
    """Fail early, naming the key, when the raw data a run needs (PANDA's folder, or the CSV of
    a CSV dataset) is missing."""
    if params.data.source == "csv":
        csv_path = resolve_path(expand_env(params.data.csv_path or ""))
        if not csv_path.is_file():
            raise ParamsError(f"data.csv_path: {csv_path} does not exist (or is not a file)")
        return
    if params.data.source != "panda":
        return
    raw = params.panda
    for required in (raw.labels, raw.images):
        if not required.exists():
            raise ParamsError(
                f"data.panda_dir: {required} does not exist; put PANDA's {raw.labels.name} and "
                f"{raw.images.name}/ under {raw.root} or set PANDA_DIR"
            )


def expand_env(value: str) -> str:
    """Replace ``${VAR}`` / ``${VAR:-default}`` with the environment's value."""

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ParamsError(f"environment variable {name} is not set and has no default")
        return default

    return _ENV_PATTERN.sub(replace, value)


def stream_stride(params: Params) -> int:
    """Total stride of the streamed part of the network."""
    return STREAM_STRIDE[params.streaming.stream_until]


def format_params(params: Params) -> str:
    """The resolved settings as YAML text, for notebooks and ``params.yaml`` in run dirs."""
    header = f"# experiment {params.experiment}: settings validated by repro.config\n"
    return header + yaml.safe_dump(params.to_dict(), sort_keys=False)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def unknown_key(key: str, valid: typing.Iterable[str], prefix: str) -> str:
    """The error text for an unknown key, with the closest valid key as a hint."""
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return f"{prefix}{key}: unknown key{hint}"


def _build_section(cls: type, values: dict[str, Any], section: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    accepted: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            errors.append(unknown_key(key, fields, f"{section}."))
            continue
        if isinstance(value, str):
            try:
                value = expand_env(value)
            except ParamsError as error:
                errors.append(f"{section}.{key}: {error}")
                continue
        coerced, problem = _coerce(value, hints[key])
        if problem:
            errors.append(f"{section}.{key}: {problem}")
        else:
            accepted[key] = coerced
    return cls(**accepted)


def _coerce(value: Any, annotation: Any) -> tuple[Any, str | None]:
    """Check ``value`` against a field annotation; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None, None
        for option in options:
            if option is type(None):
                continue
            coerced, problem = _coerce(value, option)
            if problem is None:
                return coerced, None
        names = " or ".join(_type_name(option) for option in options)
        return None, f"expected {names}, got {value!r}"
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value in choices:
            return value, None
        return None, f"must be one of {', '.join(map(repr, choices))}, got {value!r}"
    if annotation is bool:
        return (value, None) if isinstance(value, bool) else (None, f"expected bool, got {value!r}")
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (value, None) if ok else (None, f"expected int, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value), None
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            return float(value), None  # PyYAML reads 1e-5 (no dot) as a string
        return None, f"expected float, got {value!r}"
    if annotation is str:
        return (value, None) if isinstance(value, str) else (None, f"expected str, got {value!r}")
    raise TypeError(f"unsupported annotation {annotation!r}")


def _type_name(annotation: Any) -> str:
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _check_values(params: Params) -> list[str]:
    """Range checks that need more than a type."""
    errors: list[str] = []

    def require(condition: bool, key: str, message: str) -> None:
        if not condition:
            errors.append(f"{key}: {message}, got {_lookup(params, key)!r}")

    for section in ("train", "mil"):
        settings = getattr(params, section)
        for key in ("lr", "stage2_lr"):
            require(getattr(settings, key) > 0, f"{section}.{key}", "must be > 0")
        for key in ("epochs", "stage2_epochs"):
            require(getattr(settings, key) >= 0, f"{section}.{key}", "must be >= 0")
        require(settings.batch_size >= 1, f"{section}.batch_size", "must be >= 1")
        require(0 <= settings.momentum < 1, f"{section}.momentum", "must be in [0, 1)")
        require(settings.window >= 1, f"{section}.window", "must be >= 1")
        require(
            settings.calibrate_batchnorm_images >= 0,
            f"{section}.calibrate_batchnorm_images",
            "must be >= 0",
        )
    require(params.train.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    require(params.run.torch_threads >= 0, "run.torch_threads", "must be >= 0")
    epoch_images = params.train.epoch_images
    require(epoch_images is None or epoch_images >= 1, "train.epoch_images", "must be >= 1")
    stride = stream_stride(params)
    tile = params.streaming.tile_size
    require(
        tile > 0 and tile % stride == 0,
        "streaming.tile_size",
        f"must be a positive multiple of the streamed part's stride {stride} "
        f"(stream_until={params.streaming.stream_until})",
    )
    budget = params.streaming.memory_budget_gb
    require(budget is None or budget > 0, "streaming.memory_budget_gb", "must be > 0")
    require(params.data.input_size > 0, "data.input_size", "must be > 0")
    require(params.data.target_mpp > 0, "data.target_mpp", "must be > 0")
    mpp = params.data.mpp_override
    require(mpp is None or mpp > 0, "data.mpp_override", "must be > 0")
    require(params.data.synthetic_images >= 0, "data.synthetic_images", "must be >= 0")
    require(
        params.data.source != "synthetic" or params.data.synthetic_images >= 10,
        "data.synthetic_images",
        "must be >= 10 for the synthetic source",
    )
    require(params.data.synthetic_size >= 64, "data.synthetic_size", "must be >= 64")
    require(
        params.data.source != "csv" or bool(params.data.csv_path),
        "data.csv_path",
        "must name the dataset's CSV when data.source is csv",
    )
    fractions = params.splits.tune_fraction + params.splits.test_fraction
    for key in ("tune_fraction", "test_fraction"):
        require(0 < getattr(params.splits, key) < 1, f"splits.{key}", "must be in (0, 1)")
    if fractions >= 1:
        errors.append(f"splits: tune_fraction + test_fraction must be < 1, got {fractions:.3f}")
    subset = params.splits.subset_size
    require(subset is None or subset >= 2, "splits.subset_size", "must be >= 2 or null")
    require(
        0 < params.splits.subset_negative_fraction < 1,
        "splits.subset_negative_fraction",
        "must be in (0, 1)",
    )
    require(params.mil.patch_size > 0, "mil.patch_size", "must be > 0")
    require(params.mil.patch_stride > 0, "mil.patch_stride", "must be > 0")
    require(
        0 <= params.mil.min_tissue_fraction <= 1, "mil.min_tissue_fraction", "must be in [0, 1]"
    )
    require(params.mil.inference_batch_size >= 1, "mil.inference_batch_size", "must be >= 1")
    require(params.evaluation.n_bootstrap >= 1, "evaluation.n_bootstrap", "must be >= 1")
    require(
        params.evaluation.smoothgrad_samples >= 1, "evaluation.smoothgrad_samples", "must be >= 1"
    )
    require(params.evaluation.smoothgrad_noise >= 0, "evaluation.smoothgrad_noise", "must be >= 0")
    require(params.evaluation.heatmap_size >= 16, "evaluation.heatmap_size", "must be >= 16")
    require(params.run.num_workers >= 0, "run.num_workers", "must be >= 0")
    require(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", params.run.device) is not None,
        "run.device",
        "must be auto, cpu, cuda or cuda:N",
    )
    return errors


def _lookup(params: Params, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(params, section), name)
