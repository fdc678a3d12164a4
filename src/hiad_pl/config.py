"""The one config model of a run, read by the CLI, HRTrainer, the task generators and the orchestrator.

Detector settings come in two shapes, and this module is the only place that reads either:

- the tutorial's: a flat mapping of detector options as in HiAD's ``configs/patchcore.yaml``
  (optionally with ``class_path``, ``patch_size`` or ``thumbnail_size``), handed to
  ``HRTrainer(config={'patch': ..., 'thumbnail': ...})``;
- the CLI's: ``{class_path, init_args}`` (a whole CLI config handed to HRTrainer as its
  ``patch`` section is read too).

Both become a :class:`DetectorConfig`: the detector class and, per branch (patch,
thumbnail), its validated keyword arguments, its input size and the Trainer options the
file implies. HiAD's option names (``flow_step``, ``num_epochs``, ``embed_dimension``)
are translated through each detector's ``hiad_option_names``; HiAD's step counters
(``eval_per_steps``, ``log_per_steps``) become Trainer options.

Loggers and callbacks are kept as ``{class_path, init_args}`` specs and built fresh for
every task (:func:`task_loggers`, :func:`task_callbacks`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ArgumentError, ArgumentParser, Namespace

from hiad_pl.errors import ConfigError, InputError, UserError
from hiad_pl.private_apis import parser_destinations
from hiad_pl.registry import get_detector

#: Keys that size a branch's input; they are not detector arguments.
SIZE_KEYS = ("patch_size", "thumbnail_size")
#: Detector arguments set per task by the orchestrator (patch or thumbnail size, fusion).
DERIVED_DETECTOR_KEYS = ("input_size", "fusion_weights")
#: ``lightning.Trainer`` arguments that hiad-pl sets for every task (one device per task).
RESERVED_TRAINER_KEYS = ("accelerator", "devices", "strategy", "num_nodes", "default_root_dir")
#: HiAD's step counters in detector files, as Trainer options.
HIAD_TRAINER_OPTIONS: dict[str, Callable[[int], dict[str, Any]]] = {
    "eval_per_steps": lambda steps: {"val_check_interval": int(steps), "check_val_every_n_epoch": None},
    "log_per_steps": lambda steps: {"log_every_n_steps": int(steps)},
}
#: Where a logger writes inside a model folder, when its config names no folder.
LOGGER_FOLDERS = {"mlflow": "mlruns"}

Size = int | list[int]


def import_class(path: str) -> type:
    """Import ``module.Name``."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"cannot import {path!r}: {error}") from error


def class_path(cls: type) -> str:
    """``module.Name`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def detector_class_of(value: type | str) -> type:
    """The detector class for a class, a short name (``patchcore``), a class name or an import path."""
    return get_detector(value)


# ------------------------------------------------------------------ validation


def did_you_mean(name: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@functools.cache
def _options_parser(cls: type) -> ArgumentParser:
    """A parser of ``cls``'s typed keyword arguments (derived ones left out)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, skip=set(DERIVED_DETECTOR_KEYS))
    return parser


def option_names(cls: type) -> list[str]:
    """The options a config may give ``cls`` (its typed keyword arguments, derived ones left out)."""
    # nested settings (a dataclass-typed option) bring a ``<option>.help`` action of their own
    return [
        dest for dest in parser_destinations(_options_parser(cls))
        if dest not in ("help", "config") and not dest.endswith(".help")
    ]


def validate_options(cls: type, options: Mapping[str, Any], section: str) -> dict[str, Any]:
    """``options`` checked against ``cls``'s typed signature and converted to its types.

    Raises:
        ConfigError: naming ``section``, the offending option and the valid ones.
    """
    valid = option_names(cls)
    for name in options:
        if name not in valid:
            raise ConfigError(
                f"{section}: {cls.__name__} has no option {name!r}{did_you_mean(name, valid)}; "
                f"valid options: {', '.join(valid)}"
            )
        settings = _settings_type(cls, name)
        if settings is not None and isinstance(options[name], Mapping):
            _check_settings(settings, options[name], f"{section}: {cls.__name__} option {name!r}")
    try:
        parsed = _options_parser(cls).parse_object(dict(options), defaults=False)
    except ArgumentError as error:
        raise ConfigError(f"{section}: bad value for {cls.__name__}: {error}") from None
    plain = {name: _plain(parsed[name]) for name in options}
    # a nested setting keeps only the keys given: the detector's own defaults fill the rest
    return {
        name: {k: v for k, v in value.items() if k in options[name]}
        if isinstance(value, dict) and isinstance(options[name], Mapping) else value
        for name, value in plain.items()
    }


def _settings_type(cls: type, name: str) -> type | None:
    """The dataclass that types ``cls``'s keyword argument ``name`` (alone or in a union), or ``None``."""
    try:
        hint = typing.get_type_hints(cls.__init__).get(name)  # type: ignore[misc]  # the class, not an instance
    except (NameError, TypeError):  # an annotation that does not resolve here: the parser reports bad values
        return None
    for candidate in typing.get_args(hint) or (hint,):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _check_settings(settings: type, given: Mapping[str, Any], where: str) -> None:
    """Unknown keys of a dataclass-typed option, with the closest field, and the dataclass's own checks.

    Raises:
        ValueError: naming ``where``, the key or value and what is valid.
    """
    names = [f.name for f in dataclasses.fields(settings)]
    for key in given:
        if key not in names:
            raise ValueError(f"{where} has no setting {key!r}{did_you_mean(str(key), names)}; settings: {', '.join(names)}")
    try:
        settings(**given)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None


def _plain(value: Any) -> Any:
    """Namespaces (nested typed values) as dicts, tuples as lists: what checkpoints store."""
    if isinstance(value, Namespace):
        return value.as_dict()
    if isinstance(value, tuple):
        return list(value)
    return value


# ------------------------------------------------------------------ detectors


@dataclass(frozen=True)
class BranchConfig:
    """One branch's detector settings: keyword arguments, input size, Trainer options.

    Args:
        options: the detector's validated keyword arguments (without ``input_size`` and
            ``fusion_weights``, which the orchestrator sets per task).
        size: ``patch_size`` or ``thumbnail_size`` (int or [width, height]); ``None`` when
            the tasks give it.
        trainer: Trainer options the settings imply (HiAD's ``eval_per_steps``, ``log_per_steps``).
    """

    options: dict[str, Any]
    size: Size | None = None
    trainer: dict[str, Any] = field(default_factory=dict)


def _flat_options(spec: Mapping[str, Any], section: str) -> tuple[str | None, dict[str, Any]]:
    """``(class_path or None, options)`` of a flat or ``{class_path, init_args}`` mapping."""
    spec = dict(spec)
    path = spec.pop("class_path", None)
    if "init_args" in spec:
        init = spec.pop("init_args") or {}
        if not isinstance(init, Mapping):
            raise ConfigError(f"{section}: init_args must be a mapping, got {init!r}")
        spec = {**spec, **init}
    return path, spec


def branch_config(cls: type, spec: Mapping[str, Any] | None, section: str) -> BranchConfig:
    """One branch of a tutorial config (flat HiAD options) or of a CLI ``detector`` section."""
    path, options = _flat_options(spec or {}, section)
    if path is not None and detector_class_of(path) is not cls:
        raise ConfigError(f"{section}: class_path {path!r} is not the detector {class_path(cls)}")
    size = None
    for key in SIZE_KEYS:
        if key in options:
            size = options.pop(key)
    trainer: dict[str, Any] = {}
    for key, to_trainer in HIAD_TRAINER_OPTIONS.items():
        if key in options:
            trainer.update(to_trainer(options.pop(key)))
    renames = getattr(cls, "hiad_option_names", {})
    options = {renames.get(k, k): v for k, v in options.items() if k not in DERIVED_DETECTOR_KEYS}
    return BranchConfig(validate_options(cls, options, section), size, trainer)


def load_detector_file(path: str | Path) -> dict[str, Any]:
    """A YAML detector file as a mapping (a clear error naming the file otherwise)."""
    import yaml

    path = Path(path)
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(f"{path}: cannot read the detector file ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: a detector file holds a mapping of options, got {type(content).__name__}")
    return content


def _is_cli_config(section: Mapping[str, Any]) -> bool:
    """Whether a mapping is a whole CLI config (it has a ``detector`` section)."""
    return isinstance(section.get("detector"), Mapping)


@dataclass(frozen=True)
class DetectorConfig:
    """The detector class and its patch and thumbnail branches: what every task's detector is built from."""

    detector_class: type
    patch: BranchConfig
    thumbnail: BranchConfig | None = None

    def branch(self, thumbnail: bool) -> BranchConfig:
        """The thumbnail or the patch branch."""
        if thumbnail and self.thumbnail is None:
            raise ConfigError("a thumbnail task needs a thumbnail config (thumbnail_size and its detector options)")
        return self.thumbnail if thumbnail else self.patch  # type: ignore[return-value]

    @staticmethod
    def from_tutorial(detector_class: type | str | None, config: Mapping[str, Any] | None) -> DetectorConfig:
        """The tutorial's ``{'patch': {...}, 'thumbnail': {...}}`` (or the patch section alone).

        Each section is a flat detector file (HiAD's option names) plus ``patch_size`` /
        ``thumbnail_size``, or a whole CLI config. ``detector_class`` may be ``None`` when
        the files name it (``class_path``).
        """
        if not config:
            raise ConfigError("the detector config is empty: give {'patch': {...detector options, 'patch_size': ...}}")
        config = dict(config)
        if "patch" not in config:
            config = {"patch": config}
        unknown = set(config) - {"patch", "thumbnail"}
        if unknown:
            raise ConfigError(f"config has unknown sections {sorted(unknown)}; expected 'patch' and optionally 'thumbnail'")
        patch, thumbnail = dict(config["patch"] or {}), config.get("thumbnail")
        if _is_cli_config(patch):
            base = DetectorConfig.from_cli(patch, detector_class)
        else:
            cls = _chosen_class(detector_class, patch.get("class_path"), "config['patch']")
            base = DetectorConfig(cls, branch_config(cls, patch, "config['patch']"))
        if thumbnail is None:
            return base
        return DetectorConfig(base.detector_class, base.patch, _tutorial_thumbnail(base.detector_class, thumbnail))

    @staticmethod
    def from_cli(run: Mapping[str, Any], detector_class: type | str | None = None) -> DetectorConfig:
        """The ``detector`` / ``data.patch_size`` / ``thumbnail`` sections of a CLI config."""
        spec = dict(run["detector"])
        cls = _chosen_class(detector_class, spec.get("class_path"), "detector")
        patch = branch_config(cls, spec, "detector")
        patch = BranchConfig(patch.options, (run.get("data") or {}).get("patch_size", patch.size), patch.trainer)
        section = run.get("thumbnail")
        if not section or section.get("thumbnail_size") is None:
            return DetectorConfig(cls, patch)
        section = dict(section)
        init = section.get("init_args") or {}
        if isinstance(init, str):
            init = load_detector_file(init)
        overrides = branch_config(cls, init, "thumbnail.init_args")
        thumb = BranchConfig(
            {**patch.options, **overrides.options}, section["thumbnail_size"], {**patch.trainer, **overrides.trainer}
        )
        return DetectorConfig(cls, patch, thumb)


def _tutorial_thumbnail(cls: type, thumbnail: Mapping[str, Any]) -> BranchConfig:
    """The tutorial's thumbnail section: a detector file (flat or CLI-shaped) plus ``thumbnail_size``."""
    thumbnail = dict(thumbnail)
    if _is_cli_config(thumbnail):
        branch = DetectorConfig.from_cli({"detector": thumbnail["detector"]}, cls).patch
        branch = BranchConfig(branch.options, thumbnail.get("thumbnail_size"), branch.trainer)
    else:
        branch = branch_config(cls, thumbnail, "config['thumbnail']")
    if branch.size is None:
        raise ConfigError("config['thumbnail'] needs 'thumbnail_size'")
    return branch


def _chosen_class(given: type | str | None, named: str | None, section: str) -> type:
    """The detector class given to the trainer, else the one the config names."""
    if given is None and named is None:
        raise ConfigError(f"{section}: no detector: pass detector_class (e.g. HRPatchCore) or give class_path")
    return detector_class_of(given if given is not None else named)  # type: ignore[arg-type]


def patch_options(detector_class: type | str, detector_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The patch branch's keyword arguments (what a task generator embeds patches with)."""
    if not detector_config:
        return {}
    return DetectorConfig.from_tutorial(detector_class, detector_config).patch.options


# ------------------------------------------------------------------ loggers and callbacks


def _specs(value: Any, section: str) -> list[Mapping[str, Any]]:
    """One spec or a list of specs, each ``{class_path, init_args}`` or an import path."""
    items = value if isinstance(value, (list, tuple)) else [value]
    specs = []
    for item in items:
        if isinstance(item, str):
            item = {"class_path": item}
        if isinstance(item, Namespace):
            item = item.as_dict()
        if not isinstance(item, Mapping) or "class_path" not in item:
            raise ConfigError(
                f"{section}: give {{class_path: ..., init_args: {{...}}}} (one is built for every task), got {item!r}"
            )
        specs.append(item)
    return specs


def instantiate(spec: Mapping[str, Any] | str, section: str = "config", **defaults: Any) -> Any:
    """Build an object from ``{class_path, init_args}`` (or a bare import path).

    ``defaults`` fill arguments the spec leaves out; arguments the class does not take
    are reported with the config ``section`` they came from, before anything is built.
    """
    if isinstance(spec, str):
        spec = {"class_path": spec}
    cls = import_class(spec["class_path"])
    kwargs = {**defaults, **dict(spec.get("init_args") or {})}
    check_arguments(cls, kwargs, section)
    try:
        return cls(**kwargs)
    except UserError:
        raise
    except (ValueError, TypeError) as error:
        # what a constructor rejects here are the values of the config section it was built from
        raise ConfigError(f"{section}: bad init_args for {cls.__name__}: {error}") from error


def check_arguments(cls: type, kwargs: Mapping[str, Any], section: str) -> None:
    """Raise a ConfigError naming ``section`` when ``cls`` cannot be called with ``kwargs``."""
    signature = inspect.signature(cls)
    accepted = [p for p in signature.parameters if p not in ("args", "kwargs")]
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        hints = "".join(did_you_mean(k, accepted) for k in kwargs if k not in accepted)
        raise ConfigError(
            f"{section}: bad init_args for {cls.__name__} ({error}){hints}; it accepts: {', '.join(accepted)}"
        ) from None


def task_loggers(spec: Any, task: str, model_folder: Path, tensorboard_folder: Path) -> list[Any] | bool:
    """Fresh loggers for one task: TensorBoard by default, else the configured ones.

    Each logger gets the task as its run (``version`` of folder loggers, ``run_name`` of
    MLflow, ``name`` of W&B) and a folder in the model folder, wherever its config leaves
    them unset or at the class's default.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    if spec is None or spec is True:
        return [TensorBoardLogger(save_dir=str(tensorboard_folder), name="", version=task)]
    if spec is False:
        return False
    loggers = []
    for item in _specs(spec, "trainer.logger"):
        cls = import_class(item["class_path"])
        parameters = inspect.signature(cls).parameters
        short = cls.__name__.lower().removesuffix("logger")
        folder = tensorboard_folder if issubclass(cls, TensorBoardLogger) else model_folder / LOGGER_FOLDERS.get(short, short)
        per_task: dict[str, Any] = {"save_dir": str(folder)}
        if "run_name" in parameters:  # MLflow
            per_task["run_name"] = task
        elif "project" in parameters:  # W&B: its version is a run id, unique per project, so name the run only
            per_task["name"] = task
        elif "version" in parameters:  # folder loggers: <save_dir>/<task>/
            per_task.update(name="", version=task)
        given = {k: v for k, v in dict(item.get("init_args") or {}).items()
                 if k not in per_task or k not in parameters or v != parameters[k].default}
        kwargs = {**{k: v for k, v in per_task.items() if k in parameters}, **given}
        loggers.append(instantiate({"class_path": item["class_path"], "init_args": kwargs}, "trainer.logger"))
    return loggers


def task_callbacks(spec: Any) -> list[Any]:
    """Fresh user callbacks for one task (appended to hiad-pl's own)."""
    if not spec:
        return []
    return [instantiate(item, "trainer.callbacks") for item in _specs(spec, "trainer.callbacks")]


def check_trainer_options(options: Mapping[str, Any]) -> None:
    """Refuse Trainer options that hiad-pl sets for every task."""
    clash = sorted(set(options) & set(RESERVED_TRAINER_KEYS))
    if clash:
        raise ConfigError(f"trainer options {clash} are set by hiad-pl per task; choose devices with gpu_ids/devices")


# ------------------------------------------------------------------ the run


def as_list(value: Any) -> list[Any] | None:
    """A list option given as one value (``--categories texture``) as a one-item list."""
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, tuple):
        return list(value)
    return [value]


#: Pixels of real image context read around every patch by default (``data.context_margin``).
DEFAULT_CONTEXT_MARGIN = 16


@dataclass
class DataConfig:
    """Where the images are and how they are cut.

    Args:
        root: data set: a folder of MVTec-style categories, one category, a flat folder (train*/test* images) or a .jsonl list.
        categories: categories to use (default: all found); one name or a list.
        image_size: detection resolution, int or [width, height]; images are resized to it.
        patch_size: patch size, int or [width, height].
        stride: tiling stride (default: patch_size, no overlap).
        ds_factors: down-sampling factors (powers of two) for multi-resolution feature fusion, e.g. [0, 1].
        context_margin: pixels of real image context read around every patch (mirrored only at the image
            border) and cropped from its map before stitching: removes the seams that zero padding at patch
            borders leaves in the stitched map; 0 reads the bare patch.
        batch_size: patches per step.
        num_workers: data loader worker processes per task.
    """

    root: str = "demo_data"
    categories: list[str] | str | None = None
    image_size: int | list[int] = 2048
    patch_size: int | list[int] = 512
    stride: int | list[int] | None = None
    ds_factors: list[int] | int | None = None
    context_margin: int = DEFAULT_CONTEXT_MARGIN
    batch_size: int = 8
    num_workers: int = 0

    def __post_init__(self) -> None:
        self.categories = as_list(self.categories)
        self.ds_factors = as_list(self.ds_factors)


@dataclass
class ThumbnailConfig:
    """The low-resolution branch: the whole image, down-sampled, scored by its own detector.

    Args:
        thumbnail_size: side (int or [width, height]) the whole image is down-sampled to; null: no thumbnail branch.
        init_args: detector options that differ from detector.init_args on this branch (HiAD's names
            accepted, e.g. {num_epochs: 500}), or a detector file (configs/fastflow_thumbnail.yaml).
    """

    thumbnail_size: int | list[int] | None = None
    init_args: dict[str, Any] | str = field(default_factory=dict)


@dataclass
class ThresholdSection:
    """How each category's image and pixel thresholds (OK/NG, predicted masks) are chosen after fitting.

    Args:
        rule: "auto" (f1_adaptive with a synthetic validation set, else normal_fpr; given when
            image and pixel are set), "f1_adaptive" (best F1 on the synthetic validation images),
            "normal_fpr" (false-alarm budget on held-out normal images), "given", or "none" (no
            thresholds, no image held out: scores and maps only, e.g. benchmarks on all training images).
        normal_fpr: share of normal images allowed above the image threshold.
        pixel_fpr: share of normal pixels allowed above the pixel threshold (1e-4: with 1e-2 every
            good image shows 1 % of its pixels as predicted defects; null: normal_fpr).
        holdout: share of the training images held out of fitting for normal_fpr (seeded by seed).
        image: the image threshold of rule "given", on the scores as output.
        pixel: the pixel threshold of rule "given", on the scores as output.
    """

    rule: Literal["auto", "f1_adaptive", "normal_fpr", "given", "none"] = "auto"
    normal_fpr: float = 0.01
    pixel_fpr: float | None = 1e-4
    holdout: float = 0.1
    image: float | None = None
    pixel: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.normal_fpr < 1.0 or (self.pixel_fpr is not None and not 0.0 <= self.pixel_fpr < 1.0):
            raise ValueError(f"threshold.normal_fpr and pixel_fpr must lie in [0, 1), got {self.normal_fpr}, {self.pixel_fpr}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"threshold.holdout must lie in (0, 1), got {self.holdout}")
        if (self.image is None) != (self.pixel is None):
            raise ValueError("give both threshold.image and threshold.pixel (or neither)")
        if self.rule == "given" and self.image is None:
            raise ValueError("threshold.rule given needs threshold.image and threshold.pixel")
        if self.image is not None and self.rule not in ("auto", "given"):
            raise ValueError(f"threshold.image and threshold.pixel are the rule 'given', not {self.rule!r}")

    def resolved(self, has_validation: bool) -> str:
        """The rule that applies: ``auto`` resolved against the run's validation set."""
        if self.rule != "auto":
            return self.rule
        if self.image is not None:
            return "given"
        return "f1_adaptive" if has_validation else "normal_fpr"


@dataclass
class EvaluationConfig:
    """How `hiad-pl test` evaluates.

    Args:
        evaluators: evaluator import paths (or {function: path, kwargs: {...}}); default: image, pixel and PRO metrics.
        vis_size: side of each visualisation panel in pixels (0: no visualisations).
    """

    evaluators: list[Any] | None = None
    vis_size: int = 1024


@dataclass
class RayOptions:
    """Settings of the Ray launcher.

    Args:
        address: an existing cluster (``auto``: the one this machine belongs to; ``ray://host:10001``);
            ``None`` starts a local cluster for the run and stops it after.
        num_cpus: CPUs of the local cluster (default: all of this machine's); ignored with ``address``.
        cpus_per_task: CPUs each task fit or scoring shard asks for.
        gpus_per_task: GPUs each task fit or scoring shard asks for (0: CPU only).
        max_retries: how often a task whose worker died is started again (it resumes from its last epoch).
        shards: scoring shards of the test images (default: one per ``cpus_per_task`` CPUs of the cluster).
    """

    address: str | None = None
    num_cpus: int | None = None
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    max_retries: int = 3
    shards: int | None = None

    def __post_init__(self) -> None:
        if self.cpus_per_task <= 0:
            raise ConfigError(f"ray cpus_per_task must be positive, got {self.cpus_per_task}")
        if self.gpus_per_task < 0:
            raise ConfigError(f"ray gpus_per_task must be >= 0, got {self.gpus_per_task}")
        if self.max_retries < 0:
            raise ConfigError(f"ray max_retries must be >= 0, got {self.max_retries}")
        if self.shards is not None and self.shards <= 0:
            raise ConfigError(f"ray shards must be positive, got {self.shards}")



@dataclass
class RunConfig:
    """Everything `fit` and `test` need: the parsed CLI config."""

    run_dir: Path
    data: DataConfig
    detector: dict[str, Any]
    tasks: dict[str, Any]
    thumbnail: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    threshold: ThresholdSection = field(default_factory=ThresholdSection)
    trainer: dict[str, Any] = field(default_factory=dict)
    devices: list[int | str] = field(default_factory=list)
    seed: int = 0
    fusion_weights: list[float] | None = None
    early_stop_epochs: int = -1
    resume: bool = True
    refit: bool = False
    launcher: str = "local"
    ray: RayOptions = field(default_factory=RayOptions)

    def __post_init__(self) -> None:
        self.devices = as_list(self.devices) or []
        if isinstance(self.ray, Mapping):
            self.ray = RayOptions(**self.ray)
        self.fusion_weights = as_list(self.fusion_weights)
        if isinstance(self.threshold, Mapping):
            self.threshold = ThresholdSection(**self.threshold)

    @functools.cached_property
    def detectors(self) -> DetectorConfig:
        """The detector class and its patch and thumbnail branches."""
        return DetectorConfig.from_cli(
            {"detector": self.detector, "data": {"patch_size": self.data.patch_size}, "thumbnail": self.thumbnail}
        )

    @staticmethod
    def from_dict(plain: Mapping[str, Any]) -> RunConfig:
        """A parsed CLI config (as a dict) -> :class:`RunConfig`."""
        return RunConfig(
            run_dir=Path(plain["run_dir"]),
            data=DataConfig(**plain["data"]),
            detector=plain["detector"],
            tasks=plain["tasks"],
            thumbnail=plain.get("thumbnail"),
            validation=plain.get("validation"),
            evaluation=EvaluationConfig(**(plain.get("evaluation") or {})),
            threshold=ThresholdSection(**(plain.get("threshold") or {})),
            trainer=dict(plain.get("trainer") or {}),
            devices=plain.get("devices") or [],
            seed=plain.get("seed", 0),
            fusion_weights=plain.get("fusion_weights"),
            early_stop_epochs=plain.get("early_stop_epochs", -1),
            resume=plain.get("resume", True),
            refit=plain.get("refit", False),
            launcher=plain.get("launcher", "local"),
            ray=plain.get("ray") or RayOptions(),
        )
