"""The CLI's commands on a run folder: fit, test, predict, print tasks.

A run folder holds one model folder per category::

    <run_dir>/config.yaml                       the resolved config
    <run_dir>/<category>/tasks.json             tasks of that category's detectors
    <run_dir>/<category>/thresholds.json        image and pixel thresholds (OK/NG, predicted masks)
    <run_dir>/<category>/holdout.json           training images held out of fitting for the thresholds
    <run_dir>/<category>/checkpoints/<task>.ckpt
    <run_dir>/<category>/tensorboard/<task>/
    <run_dir>/metrics.json  metrics.md          per-class metrics of `hiad-pl test`
    <run_dir>/visualizations/<category>/        image | overlay with outlines, score and decision
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hiad_pl import fit_settings
from hiad_pl.calibration import calibrate, model_thresholds, plan_holdout, prepare_holdout, threshold_rule
from hiad_pl.config import RunConfig, as_list, import_class, instantiate
from hiad_pl.data.discovery import CategorySplit, discover
from hiad_pl.data.sample import HRSample
from hiad_pl.data.tiling import MultiResolutionHRImageSpliter
from hiad_pl.deploy.files import input_images
from hiad_pl.engine.launchers import make_launcher
from hiad_pl.engine.runs import load_run
from hiad_pl.errors import ConfigError, DatasetError, InputError, PredictionError
from hiad_pl.orchestrator import TaskOrchestrator, ValidationConfig, resolve_devices
from hiad_pl.outputs import (
    decision_report,
    evaluate_predictions,
    run_inference,
    score_range,
    unique_stems,
    write_prediction,
    write_scores_csv,
    write_visualizations,
)
from hiad_pl.tasks.base import FeatureTaskGenerator, Task, TaskGenerator
from hiad_pl.utils.array_store import ArrayStore, Picked

log = logging.getLogger("hiad_pl")


def splits_of(config: RunConfig, test: bool = False) -> list[CategorySplit]:
    """The data set's categories: their training images, and their test images with ``test``."""
    return discover(config.data.root, config.data.categories, config.data.image_size, test=test)


def make_indexes(config: RunConfig) -> list:
    """The patch indexes of the configured image and patch sizes."""
    data = config.data
    ds_factors = as_list(data.ds_factors)
    if config.fusion_weights is not None and len(config.fusion_weights) != len(ds_factors or [0]):
        raise ConfigError(
            f"fusion_weights has {len(config.fusion_weights)} values but ds_factors has "
            f"{len(ds_factors or [0])}: give one weight per resolution"
        )
    return MultiResolutionHRImageSpliter(data.image_size, data.patch_size, data.stride, ds_factors)


def create_tasks(config: RunConfig, split: CategorySplit, samples: Sequence[HRSample] | None = None) -> list[Task]:
    """Run the configured task generator on a category's training images (or on ``samples`` of them)."""
    detectors = config.detectors
    defaults: dict[str, Any] = {}
    generator_cls = import_class(config.tasks["class_path"])
    if issubclass(generator_cls, FeatureTaskGenerator):
        defaults = {
            "detector_class": detectors.detector_class,
            "detector_config": detectors.patch.options,
            "device": config.devices,
            "batch_size": config.data.batch_size,
            "fusion_weights": config.fusion_weights,
        }
    generator: TaskGenerator = instantiate(config.tasks, "tasks", **defaults)
    return generator.create_tasks(list(split.train if samples is None else samples), make_indexes(config))


def orchestrator_for(config: RunConfig, split: CategorySplit, tasks: Sequence[Task] = ()) -> TaskOrchestrator:
    """The orchestrator of one category's model folder."""
    detectors = config.detectors
    return TaskOrchestrator(
        detectors.detector_class,
        {},
        tasks,
        config.run_dir / split.name,
        detectors=detectors,
        batch_size=config.data.batch_size,
        seed=config.seed,
        fusion_weights=config.fusion_weights,
        trainer_kwargs=config.trainer,
        num_workers=config.data.num_workers,
        early_stop_epochs=config.early_stop_epochs,
        context_margin=config.data.context_margin,
    )


def validation_config(config: RunConfig) -> ValidationConfig | None:
    """The `validation:` section as the tutorial's val_config."""
    section = {k: v for k, v in dict(config.validation or {}).items() if v is not None}
    if not section.get("anomaly_syn_fn"):
        if set(section) - {"val_sample_ratio", "normalization"}:  # more than the defaults: a forgotten synthesiser
            raise ConfigError("validation needs anomaly_syn_fn: {class_path: hiad_pl.syn.RandomBoxSynthesizer, init_args: {p: 0.5}}")
        return None
    from hiad_pl.metrics import resolve_evaluator

    section["anomaly_syn_fn"] = instantiate(section["anomaly_syn_fn"], "validation.anomaly_syn_fn")
    section["evaluators"] = [resolve_evaluator(e) for e in section.get("evaluators") or []]
    return ValidationConfig.from_any(section)


def run_settings(config: RunConfig) -> dict[str, Any]:
    """The settings of the CLI config that decide the models besides the orchestrator's own:
    data geometry and the task generator (see :mod:`hiad_pl.fit_settings`)."""
    data = config.data
    tasks = dict(config.tasks.get("init_args") or {})
    return {
        "data.image_size": data.image_size,
        "data.patch_size": data.patch_size,
        "data.stride": data.stride,
        "data.ds_factors": data.ds_factors,
        "tasks.class_path": config.tasks["class_path"],
        **fit_settings.flatten(
            "tasks.init_args", {k: v for k, v in tasks.items() if k not in fit_settings.LINKED_TASK_OPTIONS}
        ),
    }


def fit_plan(config: RunConfig, split: CategorySplit) -> tuple[str | None, list[HRSample], list[HRSample]]:
    """A category's threshold rule, the training images it is fitted on and those held out for ``normal_fpr``."""
    rule = threshold_rule(config.threshold, validation_config(config) is not None, len(split.train), split.name)
    fit_samples, held_out = plan_holdout(
        config.run_dir / split.name, split.train, config.threshold, rule or "", config.seed, refit=config.refit
    )
    return rule, fit_samples, held_out


def check_fit(config: RunConfig, splits: Sequence[CategorySplit] | None = None) -> None:
    """Refuse, before any work, a fit whose run folder was fitted with other settings (unless ``config.refit``).

    The images held out for thresholds are not fitted on, so they are part of the compared settings.
    """
    if config.refit:
        return
    val_config = validation_config(config)
    for split in splits_of(config) if splits is None else splits:
        _, fit_samples, _ = fit_plan(config, split)
        orchestrator = orchestrator_for(config, split)
        orchestrator.check_settings(orchestrator.fit_settings(fit_samples, val_config, run_settings(config)))


def fit(config: RunConfig) -> Path:
    """Fit every category and choose its thresholds; returns the run folder. A rerun with the same
    settings resumes; other settings are refused (:func:`check_fit`) unless ``config.refit`` asks to fit again."""
    splits = splits_of(config)
    val_config = validation_config(config)
    check_fit(config, splits)  # before the task generators run (feature generators embed every training patch)
    for split in splits:
        if config.refit:  # the results of the models about to be discarded
            remove_results(config.run_dir, split.name)
        folder = config.run_dir / split.name
        category_rule = threshold_rule(config.threshold, val_config is not None, len(split.train), split.name)
        fit_samples, held_out = prepare_holdout(
            folder, split.train, config.threshold, category_rule or "", config.seed, refit=config.refit
        )
        tasks = create_tasks(config, split, fit_samples)
        orchestrator = orchestrator_for(config, split, tasks)
        log.info("fitting %s: %d task(s), %d training images", split.name, len(orchestrator.tasks), len(fit_samples))
        orchestrator.fit(
            fit_samples, config.devices, val_config, resume=config.resume, launcher=config.launcher, ray=config.ray,
            refit=config.refit, settings=run_settings(config),
        )
        if category_rule is not None:
            device = resolve_devices(config.devices)[0]
            calibrate(orchestrator, config.threshold, category_rule, device, fit_samples, held_out, val_config, config.seed)
    return config.run_dir


def remove_results(run_dir: Path, category: str) -> None:
    """Delete the evaluation results that describe a category's discarded models (metrics, visualisations)."""
    import shutil

    for name in ("metrics.json", "metrics.md"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "visualizations" / category, ignore_errors=True)


def test(config: RunConfig) -> dict[str, dict]:
    """Evaluate a fitted run on every category's test images; writes metrics and visualisations."""
    from hiad_pl.metrics import default_evaluators, format_decisions, format_table, resolve_evaluator, save_report

    evaluators = (
        [resolve_evaluator(e) for e in config.evaluation.evaluators]
        if config.evaluation.evaluators
        else default_evaluators()
    )
    devices = resolve_devices(config.devices)
    device = devices[0]
    launcher = make_launcher(config.launcher, devices, config.ray)
    samples: list[HRSample] = []
    scores: list[float] = []
    splits = splits_of(config, test=True)
    for split in splits:
        if not split.test:
            raise DatasetError(f"{config.data.root}: category {split.name!r} has no test images")
    # every category's maps in one store: in memory up to its budget, on disk beyond it
    maps = ArrayStore(sum(len(split.test) for split in splits))
    decisions: dict[str, dict] = {}
    for split in splits:
        orchestrator = orchestrator_for(config, split)
        orchestrator.load(device)
        thresholds = model_thresholds(orchestrator)
        split_scores, _ = run_inference(orchestrator, split.test, device, launcher, maps, offset=len(samples))
        split_maps = Picked(maps, range(len(samples), len(samples) + len(split.test)))
        if config.evaluation.vis_size > 0:
            display = score_range(split_maps, orchestrator.normalized, thresholds)
            write_visualizations(split.test, split_maps, config.run_dir / "visualizations", config.evaluation.vis_size,
                                 display, split_scores.tolist(), thresholds)
        decisions[split.name] = decision_report(split.test, split_scores.tolist(), split_maps, thresholds)
        samples.extend(split.test)
        scores.extend(split_scores.tolist())
    import numpy as np

    results = evaluate_predictions(samples, np.asarray(scores), maps, evaluators)
    maps.close()
    save_report(results, config.run_dir, decisions)
    print(format_table(results))
    print()
    print(format_decisions(decisions))
    return results


def predict(
    run_dir: Path,
    inputs: Sequence[str | Path],
    output: Path,
    category: str | None = None,
    devices: Sequence[int | str] = (),
    strict: bool = False,
) -> Path:
    """Score new images with a fitted run: maps (16-bit PNG, .npy), overlays, predicted masks, panels
    and scores.csv with each image's OK/NG label (none for a run without thresholds).

    An image that cannot be read is skipped: the log and its ``error`` column in
    ``scores.csv`` say why, the other images are scored, and a
    :class:`~hiad_pl.errors.PredictionError` at the end counts the failures.
    With ``strict`` the first unreadable image stops the run.
    """
    paths = input_images(inputs)  # a bad input fails before the models load
    run = load_run(Path(run_dir), category, devices)
    orchestrator = run.orchestrator
    stems = unique_stems(paths)
    rows: dict[int, dict] = {}
    failures: list[InputError] = []

    def skipped(k: int, error: InputError) -> None:
        failures.append(error)
        rows[k] = {"image": str(paths[k]), "error": " ".join(str(error).split())}

    samples: list[tuple[int, HRSample]] = []
    for k, path in enumerate(paths):
        try:
            samples.append((k, HRSample(path, image_size=run.image_size, clsname=run.category)))
        except InputError as error:
            if strict:
                raise
            log.warning("skipped %s", error)
            skipped(k, error)
    pipeline = orchestrator.pipeline(run.device)
    try:
        for prediction in pipeline.predict([s for _, s in samples], skip_unreadable=not strict):
            k, sample = samples[prediction.sample_id]
            rows[k] = write_prediction(prediction, sample, Path(output), orchestrator.normalized, stems[k], run.thresholds)
    finally:
        for sample_id, problem in pipeline.skipped.items():
            skipped(samples[sample_id][0], problem)
        write_scores_csv([rows[k] for k in sorted(rows)], Path(output) / "scores.csv", orchestrator.normalized, run.thresholds)
    if failures:
        raise PredictionError(
            f"{len(failures)} of {len(paths)} image(s) could not be scored (first: {failures[0]}); "
            f"the others are in {Path(output) / 'scores.csv'}"
        )
    return Path(output)


def list_detectors(modules: Sequence[str] = ()) -> list[str]:
    """One line per registered detector, after importing ``modules`` (where user detectors live)."""
    import importlib

    from hiad_pl.detectors import describe_detectors

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"detectors --modules: cannot import {module!r}: {error}") from error
    return describe_detectors()


def print_tasks(config: RunConfig) -> None:
    """Print each category's task layout without training."""
    from hiad_pl.tasks.base import task_layout, thumbnail_task

    for split in splits_of(config):
        tasks = create_tasks(config, split)
        thumbnail = config.detectors.thumbnail
        if thumbnail is not None:
            if thumbnail.size is None:
                raise ConfigError("a thumbnail detector needs thumbnail_size")
            tasks.append(thumbnail_task(thumbnail.size))
        print(f"[{split.name}]")
        print(task_layout(tasks))
