"""The inference pipeline: whole images in, full-resolution anomaly maps and image scores out.

Per image (``images_per_step`` images at a time)::

    decode + cut patches (a background worker, ``prefetch`` images ahead, on a GPU)
      -> ONE pass of the shared frozen backbone per patch, features fused once
      -> routing on those features (by position, or retrieval to the nearest centre)
      -> each task's head on its patches' features -> normalisation
      -> stitch -> thumbnail merge -> Gaussian blur -> image score

Every task of a run is built from one detector config, so the patch tasks'
frozen backbones are one module (:func:`share_frozen_backbones`) and a patch's
features serve routing and every head. Detectors that cannot score features
computed elsewhere (``scores_shared_embedding`` False) run their own
:meth:`~hiad_pl.detectors.base.HRDetector.predict_step` on their patches.
The pipeline knows nothing of fitting; :class:`~hiad_pl.orchestrator.TaskOrchestrator`
loads the detectors and hands them over.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.datamodule import image_patches_to_batch, patch_to_batch
from hiad_pl.data.sample import HRSample, LRPatch
from hiad_pl.data.tiling import (
    HRImageIndex,
    MultiResolutionIndex,
    check_context_margin,
    inner_maps,
    stitch,
)
from hiad_pl.detectors.base import HRDetector
from hiad_pl.errors import InputError
from hiad_pl.postprocess import ImageScore, gaussian_blur, normalize_scores, upsample
from hiad_pl.tasks.base import Task
from hiad_pl.tasks.retrieval import retrieval_grid, route_features
from hiad_pl.utils.allocator import keep_freed_memory

log = logging.getLogger("hiad_pl")

#: Images decoded ahead by the background worker when the detectors run on an accelerator.
GPU_PREFETCH = 2
#: Most patches one step holds when ``images_per_step`` is chosen by the pipeline.
AUTO_STEP_PATCHES = 64


@dataclass
class Prediction:
    """The result for one image."""

    sample_id: int
    anomaly_map: Tensor  # [H, W] float32, blurred
    score: float


@dataclass
class StageTimes:
    """Seconds spent in each stage, summed over the images scored (see :meth:`per_image`).

    ``decode`` runs in the background worker, overlapped with the rest;
    ``wait`` is the time the pipeline waited for it. ``backbone`` is the shared
    pass over the patches (with fusion), ``heads`` routing plus every task's
    head (PatchCore: the k-NN search) and normalisation, ``post`` the thumbnail
    branch, the merge, the blur and the image score. ``setup`` is the one-time
    preparation of the detectors (search indexes) before the first image, not
    counted per image.
    """

    setup: float = 0.0
    decode: float = 0.0
    wait: float = 0.0
    backbone: float = 0.0
    heads: float = 0.0
    stitch: float = 0.0
    post: float = 0.0
    images: int = 0

    def per_image(self) -> dict[str, float]:
        """Mean seconds per image of every stage."""
        count = max(1, self.images)
        return {f.name: getattr(self, f.name) / count for f in fields(self) if f.name not in ("images", "setup")}


@dataclass
class DecodedImage:
    """One image cut into what the pipeline scores, ready on the CPU."""

    sample_id: int
    size: tuple[int, int]  # (width, height)
    patches: PatchBatch | None  # the routing grid's patches, in grid order
    thumbnails: list[PatchBatch]  # one per thumbnail task
    seconds: float


def _thumbnail_size(task: Task) -> tuple[int, int]:
    if task.thumbnail_size is None:
        raise ValueError(f"thumbnail task {task.name!r} has no thumbnail_size")
    return task.thumbnail_size


def share_frozen_backbones(
    detectors: Iterable[HRDetector], shared: dict[tuple, nn.Module] | None = None
) -> dict[tuple, nn.Module]:
    """Make detectors with equal frozen-backbone settings use one backbone instance.

    ``shared`` maps settings to the instance kept so far (pass the returned dict
    again to dedupe detectors loaded one at a time, so at most two copies live at
    once). Detectors whose backbone trains keep their own.
    """
    shared = {} if shared is None else shared
    for detector in detectors:
        key = detector.frozen_backbone_key()
        if key is None:
            continue
        if key in shared:
            detector.share_backbone(shared[key])
        else:
            shared[key] = detector.backbone
    return shared


def select_rows(batch: PatchBatch, rows: Sequence[int] | Tensor) -> PatchBatch:
    """The patches of ``batch`` at ``rows`` (in that order), as :func:`take_rows` takes them."""
    positions = torch.as_tensor(rows, dtype=torch.long).cpu()
    chosen = _rows_as_slice(positions)
    values: dict[str, Any] = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor):
            values[f.name] = value[chosen] if chosen is not None else value.index_select(0, positions.to(value.device))
        elif isinstance(value, list) and value:
            values[f.name] = [value[int(k)] for k in positions]
        else:
            values[f.name] = value
    return PatchBatch(**values)


def take_rows(values: Tensor, rows: Sequence[int] | Tensor) -> Tensor:
    """``values[rows]``: a view when the rows go up in one step (a chunk of a batch, or one
    position's patches of several images), a gathered copy otherwise."""
    positions = torch.as_tensor(rows, dtype=torch.long).cpu()
    chosen = _rows_as_slice(positions)
    return values[chosen] if chosen is not None else values.index_select(0, positions.to(values.device))


def _rows_as_slice(positions: Tensor) -> slice | None:
    """The slice that takes ``positions`` when they go up in one step, else ``None``."""
    if len(positions) == 0:
        return None
    steps = positions[1:] - positions[:-1]
    step = int(steps[0]) if len(steps) else 1
    if step <= 0 or not bool((steps == step).all()):
        return None
    first = int(positions[0])
    return slice(first, first + step * (len(positions) - 1) + 1, step)


def run_image_score(tasks: Sequence[Task], detectors: Mapping[str, HRDetector]) -> ImageScore:
    """The image-score rule of a run: its patch detectors' (the thumbnail detector's when it has no patch tasks).

    Raises:
        ValueError: when the patch detectors have different rules.
    """
    chosen = [t for t in tasks if not t.is_thumbnail] or list(tasks)
    by_rule: dict[ImageScore, list[str]] = {}
    for task in chosen:
        by_rule.setdefault(detectors[task.name].image_score, []).append(task.name)
    if len(by_rule) > 1:
        listed = "; ".join(f"{rule} for {', '.join(names)}" for rule, names in by_rule.items())
        raise ValueError(f"the tasks' detectors score images by different rules: {listed}")
    return next(iter(by_rule), ImageScore())
def check_margin_fits(detectors: Sequence[HRDetector], grid: Sequence[MultiResolutionIndex], margin: int) -> None:
    """Raise unless every patch detector was built for the grid's patches widened by ``margin`` on every side.

    Only checked with a margin: without one, detectors whose maps follow their
    input (CNN features) may have been built for any size.
    """
    if not margin or not grid:
        return
    main = grid[0].main_index
    wanted = (main.width + 2 * margin, main.height + 2 * margin)
    wrong = {tuple(d.input_size) for d in detectors if tuple(d.input_size) != wanted}
    if wrong:
        raise ValueError(
            f"context_margin {margin} widens the {main.width}x{main.height} patches to {wanted[0]}x{wanted[1]}, "
            f"but the patch detectors were built for {sorted(wrong)}: fit them with the same context_margin"
        )


def check_fits(sample: HRSample, indexes: Sequence[MultiResolutionIndex]) -> None:
    """Raise naming the image when it is smaller than the area ``indexes`` cover."""
    if not indexes:
        return
    width, height = sample.image_size
    if max(i.main_index.x + i.main_index.width for i in indexes) > width or max(
        i.main_index.y + i.main_index.height for i in indexes
    ) > height:
        raise ValueError(f"{sample.get_image_path()}: image size {width}x{height} is smaller than the task indexes")


class InferencePipeline:
    """Scores whole images with a run's fitted detectors, one backbone pass per patch.

    Args:
        tasks: the run's tasks (patch tasks and thumbnail tasks).
        detectors: the fitted detector of each task, by task name, in eval mode on ``device``.
        normalization: per task name, validation statistics (``low``, ``high``) that map
            its raw scores into [0, 1], or ``None`` to keep raw scores.
        batch_size: patches per backbone forward pass and per head call.
        device: where the detectors run.
        prefetch: images decoded ahead by the background worker (0: decode inline).
            Default: :data:`GPU_PREFETCH` on an accelerator, 0 on the CPU, where a
            background decoder takes a core from torch's threads and every
            parallel region waits for it (measured on 2 cores: the backbone
            stage 1.35-1.57 s per 2048-px image with prefetching, 1.21-1.24 s
            inline, the same or better wall time; docs/results.md).
        images_per_step: images whose patches are batched together. Default: enough
            images that each positional task's head gets ``batch_size`` patches per
            call (one detector per patch position scores ``batch_size`` images'
            patches at once instead of one patch), at most
            :data:`AUTO_STEP_PATCHES` patches a step; 1 with one task for all patches.
            Measured at 2048 px, O2O (16 tasks): heads 0.62 -> 0.52 s per image with
            4 images a step, the same maps to float32 rounding.
        image_score: the rule that turns a full map into the image score; default:
            the detectors' own (:func:`run_image_score`).
        context_margin: pixels of image context read around every patch (mirrored
            only at the image border), as the patch detectors were fitted
            (:class:`~hiad_pl.orchestrator.TaskOrchestrator`); each map is cropped
            back to its patch before stitching.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        detectors: Mapping[str, HRDetector],
        normalization: Mapping[str, dict | None] | None = None,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        prefetch: int | None = None,
        images_per_step: int | None = None,
        image_score: ImageScore | None = None,
        context_margin: int = 0,
    ) -> None:
        self.device = torch.device(device)
        if prefetch is None:
            prefetch = 0 if self.device.type == "cpu" else GPU_PREFETCH
        if batch_size < 1 or (images_per_step is not None and images_per_step < 1) or prefetch < 0:
            raise ValueError("batch_size and images_per_step must be positive and prefetch non-negative")
        keep_freed_memory()
        self.patch_tasks = [t for t in tasks if not t.is_thumbnail]
        self.thumbnail_tasks = [t for t in tasks if t.is_thumbnail]
        #: ``(width, height)`` each thumbnail task's image is resized to.
        self._thumbnail_sizes = [_thumbnail_size(t) for t in self.thumbnail_tasks]
        missing = [t.name for t in tasks if t.name not in detectors]
        if missing:
            raise ValueError(f"no fitted detector for tasks {missing}")
        self.detectors = dict(detectors)
        #: The image-score rule applied to each blurred full map.
        self.image_score = image_score if image_score is not None else run_image_score(tasks, self.detectors)
        self.normalization = dict(normalization or {})
        self.batch_size = int(batch_size)
        self.prefetch = int(prefetch)
        self.retrieval = any(t.centers is not None for t in self.patch_tasks)
        if self.retrieval:
            self.grid = retrieval_grid(self.patch_tasks)
        else:
            self.grid = list(dict.fromkeys(i for t in self.patch_tasks for i in t.indexes))
        #: Whether the grid's patches carry low-resolution crops (cut by the sample, not from the decoded image).
        self._low_resolution = any(i.low_resolution_indexes for i in self.grid)
        #: Pixels of image context read around every patch: what the patch detectors were fitted with.
        self.context_margin = check_context_margin(context_margin)
        check_margin_fits([self.detectors[t.name] for t in self.patch_tasks], self.grid, self.context_margin)
        position = {index: k for k, index in enumerate(self.grid)}
        #: Grid positions of each positional task's indexes, in the task's order.
        self._task_rows = [[position[i] for i in t.indexes] for t in self.patch_tasks]
        if images_per_step is None:
            images_per_step = self._auto_images_per_step()
        self.images_per_step = int(images_per_step)
        patch_detectors = [self.detectors[t.name] for t in self.patch_tasks]
        leader = patch_detectors[0] if patch_detectors else None
        self._leader = leader
        #: Whether every head scores the leader's features (one backbone, one fusion, shared-feature heads).
        self.shares_features = leader is not None and all(
            d.scores_shared_embedding
            and d.frozen_backbone_key() is not None
            and d.frozen_backbone_key() == leader.frozen_backbone_key()
            and d.fusion_weights == leader.fusion_weights
            for d in patch_detectors
        )
        self.times = StageTimes()
        start = time.perf_counter()
        for detector in self.detectors.values():
            detector.prepare_scoring()
        self.times.setup = time.perf_counter() - start
        #: Images left out by ``predict(..., skip_unreadable=True)``: sample id -> why.
        self.skipped: dict[int, InputError] = {}

    def _auto_images_per_step(self) -> int:
        """Images a step so that each task's head sees ``batch_size`` patches, within :data:`AUTO_STEP_PATCHES`."""
        per_image = len(self.grid)
        if not per_image or self.retrieval:
            return 1
        fewest = min((len(rows) for rows in self._task_rows if rows), default=per_image)
        wanted = -(-self.batch_size // fewest)
        return max(1, min(wanted, AUTO_STEP_PATCHES // per_image))

    # ------------------------------------------------------------------ decode
    def decode(self, sample: HRSample, sample_id: int) -> DecodedImage:
        """Read one image and cut the grid's patches and the thumbnails.

        Only the image file is read (a mask is ground truth for evaluation,
        not an input), and the patches are written straight into one batch
        (:func:`image_patches_to_batch`). A grid with low-resolution crops
        (``ds_factors``) is cut by the sample (which also reads the mask).
        """
        start = time.perf_counter()
        check_fits(sample, self.grid)
        try:
            pixels = sample.image.open()
            patches = None
            margin = self.context_margin
            if self._low_resolution:  # each patch carries resized crops of its enclosing regions
                patches = PatchBatch.collate([patch_to_batch(sample.patch(i, margin), sample_id) for i in self.grid])
            elif self.grid:
                mains = [i.main_index for i in self.grid]
                patches = image_patches_to_batch(pixels, mains, sample_id, sample.label, sample.clsname, margin)
            thumbnails = [
                patch_to_batch(
                    LRPatch(sample.image.resize(size), label=sample.label, clsname=sample.clsname),
                    sample_id,
                )
                for size in self._thumbnail_sizes
            ]
        finally:
            sample.close()
        return DecodedImage(sample_id, sample.image_size, patches, thumbnails, time.perf_counter() - start)

    def _decoded(self, samples: Sequence[HRSample], skip_unreadable: bool) -> Iterator[DecodedImage]:
        """Decoded images in order, ``prefetch`` ahead in a background thread.

        With ``skip_unreadable`` an image that cannot be read is left out, recorded in
        :attr:`skipped` and logged; otherwise its error stops the iteration.
        """

        def result(sample_id: int, decode: Any) -> DecodedImage | None:
            try:
                return decode()
            except InputError as error:
                if not skip_unreadable:
                    raise
                log.warning("skipped %s", error)
                self.skipped[sample_id] = error
                return None

        if self.prefetch == 0:
            for sample_id, sample in enumerate(samples):
                decoded = result(sample_id, lambda sample=sample, sample_id=sample_id: self.decode(sample, sample_id))
                if decoded is not None:
                    yield decoded
            return
        items = iter(enumerate(samples))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hiad-decode") as pool:
            pending = deque((k, pool.submit(self.decode, sample, k)) for k, sample in islice(items, self.prefetch + 1))
            while pending:
                start = time.perf_counter()
                sample_id, future = pending.popleft()
                decoded = result(sample_id, future.result)
                self.times.wait += time.perf_counter() - start
                pending.extend((k, pool.submit(self.decode, sample, k)) for k, sample in islice(items, 1))
                if decoded is not None:
                    yield decoded

    # ------------------------------------------------------------------ score
    def predict(self, samples: Sequence[HRSample], skip_unreadable: bool = False) -> Iterator[Prediction]:
        """Predictions for each sample in order (maps are not accumulated).

        With ``skip_unreadable`` images that cannot be read yield nothing and are
        listed in :attr:`skipped` (sample id -> error) instead of stopping the run.
        Without it, the images decoded before the unreadable one are still scored
        and yielded (a step of several images is cut short), then its error is raised.
        """
        group: list[DecodedImage] = []
        decoded_images = self._decoded(samples, skip_unreadable)
        while True:
            try:
                decoded = next(decoded_images)
            except StopIteration:
                break
            except InputError:
                if group:
                    yield from self.score(group)
                raise
            self.times.decode += decoded.seconds
            group.append(decoded)
            if len(group) == self.images_per_step:
                yield from self.score(group)
                group = []
        if group:
            yield from self.score(group)

    def score(self, images: Sequence[DecodedImage]) -> list[Prediction]:
        """Score decoded images together: backbone, routing, heads, stitch, post-processing."""
        with torch.inference_mode():
            fulls = self._patch_maps(images)
            start = time.perf_counter()
            predictions = []
            for image, full in zip(images, fulls):
                for task, thumbnail in zip(self.thumbnail_tasks, image.thumbnails):
                    thumb = self._head(task, thumbnail)[0]
                    merged = upsample(thumb, image.size)
                    full = merged if full is None else torch.maximum(full, merged)
                if full is None:
                    width, height = image.size
                    full = torch.zeros(height, width)
                full = gaussian_blur(full)
                predictions.append(Prediction(image.sample_id, full, float(self.image_score(full))))
            self.times.post += time.perf_counter() - start
            self.times.images += len(images)
        return predictions

    def _patch_maps(self, images: Sequence[DecodedImage]) -> list[Tensor | None]:
        """Stitched ``[H, W]`` patch maps of each image (``None`` without patch tasks)."""
        if not self.patch_tasks:
            return [None] * len(images)
        patches = PatchBatch.collate([image.patches for image in images if image.patches is not None])
        start = time.perf_counter()
        embedding = self._embed(patches) if self.shares_features or self.retrieval else []
        self.times.backbone += time.perf_counter() - start

        start = time.perf_counter()
        cells = len(self.grid)
        if self.retrieval:
            owners = route_features(embedding, self.patch_tasks)
            rows_of = [torch.nonzero(owners == k).flatten().tolist() for k in range(len(self.patch_tasks))]
        else:
            rows_of = [[n * cells + r for n in range(len(images)) for r in rows] for rows in self._task_rows]
        scored: list[tuple[list[int], Tensor]] = []
        for task, rows in zip(self.patch_tasks, rows_of):
            if rows:
                features = [take_rows(layer, rows) for layer in embedding] if self.shares_features else None
                scored.append((rows, self._head(task, select_rows(patches, rows), features)))
        self.times.heads += time.perf_counter() - start

        start = time.perf_counter()
        fulls: list[Tensor | None] = []
        for n, image in enumerate(images):
            maps: list[Tensor] = []
            mains: list[HRImageIndex] = []
            for rows, task_maps in scored:
                mine = [k for k, row in enumerate(rows) if row // cells == n]
                maps.append(task_maps[mine])
                mains.extend(self.grid[rows[k] % cells].main_index for k in mine)
            fulls.append(stitch(torch.cat(maps), mains, image.size).float() if mains else None)
        self.times.stitch += time.perf_counter() - start
        return fulls

    def _embed(self, patches: PatchBatch) -> list[Tensor]:
        """The leader's fused backbone maps of every patch, ``batch_size`` patches per forward pass."""
        leader = self._leader
        if leader is None:
            raise RuntimeError("the pipeline has no patch detector to embed patches with")
        chunks = []
        for start in range(0, len(patches), self.batch_size):
            chunk = select_rows(patches, range(start, min(start + self.batch_size, len(patches))))
            chunks.append(leader.fused_embedding(chunk.to(self.device)))
        return [torch.cat(layer) for layer in zip(*chunks)]

    def _head(self, task: Task, patches: PatchBatch, features: list[Tensor] | None = None) -> Tensor:
        """Normalised maps ``[B, h, w]`` (CPU, float32) of ``task``'s detector on ``patches``.

        With ``features`` (the patches' shared fused maps) the head scores them;
        without, the detector embeds the patches itself.
        """
        detector = self.detectors[task.name]
        outputs = []
        for start in range(0, len(patches), self.batch_size):
            stop = min(start + self.batch_size, len(patches))
            chunk = select_rows(patches, range(start, stop)).to(self.device)
            if features is None:
                maps = detector.predict_step(chunk, 0)
            else:
                maps = detector.score_embedding([layer[start:stop] for layer in features], chunk)
            outputs.append(maps.float().cpu())
        maps = torch.cat(outputs)
        if not task.is_thumbnail:  # the patch's own pixels; its context belongs to its neighbours
            maps = inner_maps(maps, self.context_margin)
        stats = self.normalization.get(task.name)
        return maps if stats is None else normalize_scores(maps, stats["low"], stats["high"])
