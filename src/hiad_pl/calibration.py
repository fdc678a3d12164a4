"""Choosing a fitted category model's thresholds (see :mod:`hiad_pl.decisions` for the rules).

``normal_fpr`` holds a seeded share of the training images out of fitting
(:func:`prepare_holdout`, recorded in ``<model>/holdout.json`` before any task is
fitted, so a rerun holds out the same images) and scores them after fitting.
``f1_adaptive`` scores the validation images the orchestrator held out (the same
seeded split), clean and with the validation set's synthetic defects drawn patch
by patch over the whole image, as the validation patches were. ``given`` takes
the user's numbers. :func:`calibrate` writes ``<model>/thresholds.json``; a rerun
with the same settings and checkpoints keeps it, any change recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hiad_pl import fit_settings
from hiad_pl.config import ThresholdSection
from hiad_pl.data.datamodule import split_validation
from hiad_pl.data.sample import HRSample, LRPatch
from hiad_pl.data.tiling import HRImageIndex
from hiad_pl.decisions import (
    Thresholds,
    display_range,
    f1_adaptive_threshold,
    given_display_range,
    quantile_threshold,
)
from hiad_pl.deploy.files import png_bytes
from hiad_pl.errors import ConfigError
from hiad_pl.orchestrator import TaskOrchestrator, ValidationConfig
from hiad_pl.run_folder import atomic_write

log = logging.getLogger("hiad_pl")

HOLDOUT_FILE = fit_settings.HOLDOUT_NAME
#: Pixels kept per image for the pixel thresholds (a seeded uniform sample above it: 1/4 of a 2048 x 2048 map).
PIXELS_PER_IMAGE = 1 << 20
#: Draws of the synthesiser over an image before a synthetic copy is left without a defect.
SYNTHESIS_DRAWS = 20
#: Fewer held-out normal images than this make the image quantile rest on a handful of scores.
FEW_NORMAL_IMAGES = 20


def split_holdout(samples: Sequence[HRSample], share: float, seed: int) -> tuple[list[HRSample], list[HRSample]]:
    """``(fitted, held out)``: a seeded ``share`` of ``samples`` (at least one, never all) held out of fitting."""
    if len(samples) < 2:
        raise ValueError(
            f"the normal_fpr threshold rule holds training images out of fitting, but there are only {len(samples)}; "
            "add training images or give the thresholds (--threshold.image X --threshold.pixel Y)"
        )
    order = sorted(range(len(samples)), key=lambda k: samples[k].get_image_path())
    random.Random(f"holdout-{seed}").shuffle(order)
    count = min(len(samples) - 1, max(1, round(share * len(samples))))
    held = set(order[:count])
    return [s for k, s in enumerate(samples) if k not in held], [s for k, s in enumerate(samples) if k in held]


def _has_checkpoints(folder: Path) -> bool:
    return any((folder / "checkpoints").glob("**/*.ckpt"))


def plan_holdout(
    folder: Path, samples: Sequence[HRSample], section: ThresholdSection, rule: str, seed: int, refit: bool = False
) -> tuple[list[HRSample], list[HRSample]]:
    """The training images to fit and those held out for ``normal_fpr`` (nothing written).

    A model folder fitted with a holdout keeps those images out of fitting whatever
    the rule now. One fitted without a holdout (or with another) cannot give
    ``normal_fpr`` thresholds: its models have seen the images it would hold out.
    With ``refit`` the folder's models are about to be discarded: its holdout is not kept.
    """
    path = folder / HOLDOUT_FILE
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not refit else None
    fitted = _has_checkpoints(folder) and not refit
    if rule != "normal_fpr":
        if saved is None:
            return list(samples), []
        held_paths = set(saved["images"])
        return [s for s in samples if s.get_image_path() not in held_paths], [
            s for s in samples if s.get_image_path() in held_paths
        ]
    fit, held = split_holdout(samples, section.holdout, seed)
    if fitted and saved is None:
        raise ValueError(
            f"{folder}: fitted on all its training images (no {HOLDOUT_FILE}), so no normal image is left to set "
            "normal_fpr thresholds on: fit into a new run folder (or refit with --refit true), or give the "
            "thresholds (--threshold.image X --threshold.pixel Y), or use a validation set (--threshold.rule f1_adaptive)"
        )
    if fitted and saved is not None and saved["images"] != [s.get_image_path() for s in held]:
        raise ValueError(
            f"{folder}: fitted with other images held out ({path}: share {saved['share']}, seed {saved['seed']}; now "
            f"share {section.holdout}, seed {seed}): the models have seen images the new holdout would use; "
            "keep threshold.holdout and seed, refit with --refit true, or fit into a new run folder"
        )
    return fit, held


def prepare_holdout(
    folder: Path, samples: Sequence[HRSample], section: ThresholdSection, rule: str, seed: int, refit: bool = False
) -> tuple[list[HRSample], list[HRSample]]:
    """:func:`plan_holdout`, recorded in ``folder/holdout.json`` before any task is fitted (a rerun holds out the same images)."""
    fit, held = plan_holdout(folder, samples, section, rule, seed, refit)
    path = folder / HOLDOUT_FILE
    if rule != "normal_fpr":
        if refit:
            path.unlink(missing_ok=True)
        elif held:
            log.info("%s: %d training image(s) stay held out of fitting, as when this folder was fitted (%s)",
                     folder.name, len(held), path)
        return fit, held
    wanted: dict[str, Any] = {"share": section.holdout, "seed": seed, "images": [s.get_image_path() for s in held]}
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if saved != wanted:
        atomic_write(path, json.dumps(wanted, indent=1) + "\n")
    log.info(
        "%s: %d of %d training images held out of fitting for the normal_fpr thresholds (share %g, seed %d; %s): %s",
        folder.name, len(held), len(samples), section.holdout, seed, path, ", ".join(Path(p).name for p in wanted["images"]),
    )
    return fit, held


def checkpoints_key(orchestrator: TaskOrchestrator) -> str:
    """A digest of the model folder's final checkpoints (name, size, modification time): thresholds follow the models."""
    entries = []
    for task in orchestrator.tasks:
        stat = orchestrator.checkpoint_path(task).stat()
        entries.append([task.name, stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def _pixel_sample(
    anomaly_map: np.ndarray, rng: np.random.Generator, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The map's pixels (and the mask's), or a seeded uniform sample of :data:`PIXELS_PER_IMAGE` of them."""
    values = anomaly_map.reshape(-1)
    truth = None if mask is None else (mask.reshape(-1) > 0)
    if values.size > PIXELS_PER_IMAGE:
        chosen = rng.choice(values.size, PIXELS_PER_IMAGE, replace=False)
        values, truth = values[chosen], None if truth is None else truth[chosen]
    return values.astype(np.float32), truth


def _score(
    orchestrator: TaskOrchestrator, samples: Sequence[HRSample], device: str, seed: int
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray | None]]:
    """Image scores, pixel samples and (for samples with masks) the matching mask samples."""
    scores = np.zeros(len(samples))
    pixels: list[np.ndarray] = [np.empty(0, np.float32)] * len(samples)
    truths: list[np.ndarray | None] = [None] * len(samples)
    for prediction in orchestrator.pipeline(device).predict(samples):
        k = prediction.sample_id
        sample = samples[k]
        mask = None if sample.mask is None else sample.mask.open()
        scores[k] = prediction.score
        full = prediction.anomaly_map.numel()
        pixels[k], truths[k] = _pixel_sample(prediction.anomaly_map.numpy(), np.random.default_rng([seed, k]), mask)
        sample.close()
        if full > PIXELS_PER_IMAGE and k == 0:
            log.warning(
                "pixel thresholds from a seeded uniform sample of %d of the %d pixels of each map (%.1f%%)",
                PIXELS_PER_IMAGE, full, 100 * PIXELS_PER_IMAGE / full,
            )
    return scores, pixels, truths


def synthetic_tiles(orchestrator: TaskOrchestrator, image_size: tuple[int, int]) -> list[HRImageIndex]:
    """The patch windows synthetic defects are drawn in: every patch position of the tasks (the whole image without patches)."""
    mains = {(i.main_index.x, i.main_index.y, i.main_index.width, i.main_index.height)
             for t in orchestrator.tasks if not t.is_thumbnail for i in t.indexes}
    if not mains:
        return [HRImageIndex(0, 0, *image_size)]
    return [HRImageIndex(*m) for m in sorted(mains, key=lambda m: (m[1], m[0]))]


def synthetic_samples(
    samples: Sequence[HRSample], synthesizer: Any, tiles: Sequence[HRImageIndex], folder: Path, seed: int
) -> list[HRSample]:
    """Copies of ``samples`` with the synthesiser applied patch by patch (seeded per image), written to ``folder``.

    Each copy is meant to be defective: when the synthesiser's draws (probability
    ``p`` per patch) leave an image clean, the image is drawn again, up to
    :data:`SYNTHESIS_DRAWS` times (a copy may stay clean with one patch and a small ``p``).
    """
    out = []
    for k, sample in enumerate(samples):
        rng = np.random.default_rng([seed, 7919, k])
        with sample:
            original = sample.image.open().copy()
        for _ in range(SYNTHESIS_DRAWS):
            image = original.copy()
            mask = np.zeros(image.shape[:2], np.uint8)
            for tile in tiles:
                rows, cols = tile.slices
                patch = synthesizer(LRPatch(image=image[rows, cols].copy()), rng)
                image[rows, cols] = patch.image
                mask[rows, cols] |= (patch.mask > 0).astype(np.uint8)
            if mask.any():
                break
        image_path, mask_path = folder / f"{k:05d}.png", folder / f"{k:05d}_mask.png"
        atomic_write(image_path, png_bytes(image, compress_level=1))
        atomic_write(mask_path, png_bytes(mask * 255, compress_level=1))
        out.append(HRSample(image_path, mask_path, image_size=sample.image_size, clsname=sample.clsname))
    return out


def calibrate(
    orchestrator: TaskOrchestrator,
    section: ThresholdSection,
    rule: str,
    device: str,
    fit_samples: Sequence[HRSample],
    held_out: Sequence[HRSample],
    val_config: ValidationConfig | None,
    seed: int = 0,
) -> Thresholds:
    """The model folder's thresholds by ``rule``, written to ``thresholds.json`` (kept when already up to date)."""
    orchestrator.load(device)
    scale = "normalised" if orchestrator.normalized else "raw"
    settings: dict[str, Any] = {"rule": rule, "scale": scale, "checkpoints": checkpoints_key(orchestrator)}
    if rule == "given":
        settings.update(image=section.image, pixel=section.pixel)
    elif rule == "normal_fpr":
        settings.update(normal_fpr=section.normal_fpr, pixel_fpr=section.pixel_fpr, held_out=[s.get_image_path() for s in held_out])
    else:
        if val_config is None:
            raise ValueError(
                "threshold rule f1_adaptive needs a validation set of synthetic anomalies (validation.anomaly_syn_fn); "
                "without one use normal_fpr"
            )
        settings.update(val_sample_ratio=val_config.val_sample_ratio, synthesizer=repr(val_config.anomaly_syn_fn), seed=seed)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=repr).encode()).hexdigest()[:16]
    existing = Thresholds.load(orchestrator.root)
    if existing is not None and existing.details.get("settings_key") == key:
        log.info("%s: thresholds up to date: %s", orchestrator.root.name, existing.describe())
        return existing
    if rule == "given":
        assert section.image is not None and section.pixel is not None  # rule "given" means both are set
        image, pixel = float(section.image), float(section.pixel)
        thresholds = Thresholds(image, pixel, rule, scale, given_display_range(pixel))
    elif rule == "normal_fpr":
        thresholds = _normal_fpr(orchestrator, section, device, held_out, scale, seed)
    else:
        if val_config is None:
            raise ConfigError("threshold.rule f1_adaptive needs a validation set (validation.anomaly_syn_fn)")
        thresholds = _f1_adaptive(orchestrator, device, fit_samples, val_config, scale, seed)
    thresholds.details.update(settings_key=key, checkpoints=settings["checkpoints"])
    path = thresholds.save(orchestrator.root)
    log.info("%s: thresholds %s -> %s", orchestrator.root.name, thresholds.describe(), path)
    return thresholds


def _normal_fpr(
    orchestrator: TaskOrchestrator, section: ThresholdSection, device: str, held_out: Sequence[HRSample], scale: str, seed: int
) -> Thresholds:
    if not held_out:
        raise ValueError(f"{orchestrator.root}: no held-out normal image to set normal_fpr thresholds on")
    image_scores, pixels, _ = _score(orchestrator, held_out, device, seed)
    normal_pixels = np.concatenate(pixels)
    pixel_fpr = section.normal_fpr if section.pixel_fpr is None else section.pixel_fpr
    if len(held_out) < FEW_NORMAL_IMAGES:
        log.warning(
            "%s: the image threshold is the %g quantile of only %d held-out normal image score(s): with so few it is "
            "close to their largest; hold out more images (threshold.holdout) for a stable false-alarm rate",
            orchestrator.root.name, 1 - section.normal_fpr, len(held_out),
        )
    pixel = quantile_threshold(normal_pixels, pixel_fpr)
    return Thresholds(
        quantile_threshold(image_scores, section.normal_fpr), pixel, "normal_fpr", scale, display_range(normal_pixels, pixel),
        {"normal_fpr": section.normal_fpr, "pixel_fpr": pixel_fpr, "held_out_images": len(held_out),
         "normal_image_score_max": float(image_scores.max()), "normal_pixels": int(normal_pixels.size)},
    )


def _f1_adaptive(
    orchestrator: TaskOrchestrator, device: str, fit_samples: Sequence[HRSample], val_config: ValidationConfig,
    scale: str, seed: int,
) -> Thresholds:
    _, clean = split_validation(list(fit_samples), val_config.val_sample_ratio, seed)
    with tempfile.TemporaryDirectory(prefix="hiad-thresholds-") as folder:
        tiles = synthetic_tiles(orchestrator, clean[0].image_size)
        defective = synthetic_samples(clean, val_config.anomaly_syn_fn, tiles, Path(folder), seed)
        clean_scores, clean_pixels, _ = _score(orchestrator, clean, device, seed)
        scores, pixels, truths = _score(orchestrator, defective, device, seed + 1)
    labels = np.array([0] * len(clean) + [int(t is not None and t.any()) for t in truths])
    if not labels.any():
        raise ValueError(
            f"{orchestrator.root}: the synthesiser drew no defect into the {len(clean)} validation image(s), so F1 has "
            "nothing to find: raise its p, or use the normal_fpr rule"
        )
    image = f1_adaptive_threshold(np.concatenate([clean_scores, scores]), labels)
    pixel_truth = np.concatenate([np.zeros(sum(p.size for p in clean_pixels), bool), *[t for t in truths if t is not None]])
    pixel = f1_adaptive_threshold(np.concatenate([*clean_pixels, *pixels]), pixel_truth)
    normal_pixels = np.concatenate(clean_pixels)
    return Thresholds(
        image["threshold"], pixel["threshold"], "f1_adaptive", scale, display_range(normal_pixels, pixel["threshold"]),
        {"validation_images": len(clean), "synthetic_defective_images": int(labels.sum()),
         "image_f1": image["f1"], "pixel_f1": pixel["f1"], "synthesizer": type(val_config.anomaly_syn_fn).__name__},
    )


def model_thresholds(orchestrator: TaskOrchestrator) -> Thresholds | None:
    """The loaded model folder's thresholds, or ``None`` (with one warning saying why) when it has none or they are stale."""
    from hiad_pl.decisions import NO_THRESHOLDS

    thresholds = Thresholds.load(orchestrator.root)
    if thresholds is None:
        log.warning("%s: %s", orchestrator.root, NO_THRESHOLDS)
        return None
    problems = []
    scale = "normalised" if orchestrator.normalized else "raw"
    if thresholds.scale != scale:
        problems.append(f"they apply to {thresholds.scale} scores, the model outputs {scale} ones")
    saved = thresholds.details.get("checkpoints")
    if saved is not None and saved != checkpoints_key(orchestrator):
        problems.append("the checkpoints changed since they were chosen")
    if problems:
        log.warning(
            "%s: thresholds.json is stale (%s): no OK/NG decision; rerun `hiad-pl fit` on this run folder to choose them again",
            orchestrator.root, "; ".join(problems),
        )
        return None
    return thresholds


def threshold_rule(section: ThresholdSection, has_validation: bool, num_train: int, name: str) -> str | None:
    """The rule a category's thresholds are chosen by; ``None`` for rule ``none`` and (with a warning)
    when the default rule has too few training images to hold any out."""
    rule = section.resolved(has_validation)
    if rule == "none":
        return None
    if rule == "normal_fpr" and section.rule == "auto" and num_train < 2:
        log.warning(
            "%s: only %d training image: none can be held out for thresholds, so this model makes no OK/NG "
            "decision; give them with --threshold.image X --threshold.pixel Y", name, num_train,
        )
        return None
    return rule
