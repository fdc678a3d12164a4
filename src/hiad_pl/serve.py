"""``hiad-pl serve``: an HTTP service that scores images with a fitted run.

Built on FastAPI + uvicorn. The run is loaded once into the server process;
concurrent requests are grouped by a small batching queue (at most
``max_batch_size`` images, waiting at most ``max_wait_ms`` for more) and each
group is scored together: every task's patches of all its images go through
the task's detector in shared batches (:func:`predict_batch`). Decoding runs in
the request threads, scoring in one worker thread, so the event loop never blocks.

Endpoints:

``GET /health``
    ``{"status": "ok", "category", "image_size", "tasks", "normalized", "threshold",
    "pixel_threshold", "threshold_rule", ...}``.
``POST /predict`` (multipart, file field ``image``; ``?map=true`` adds the map, ``?mask=true`` the predicted mask)
    ``{"image_score", "label" (OK/NG), "is_anomalous", "threshold", "pixel_threshold",
    "threshold_rule", "normalized", "batch_size"}``, plus ``anomaly_map_png`` (base64
    16-bit PNG spanning ``map_min..map_max``) or, with ``map_format=npy``,
    ``anomaly_map_npy`` (base64 float32 ``.npy``, exact), and ``mask_png`` (base64 PNG,
    255 where the pixel score is above the pixel threshold). A run without thresholds
    answers ``label``, ``is_anomalous`` and ``mask_png`` with null and says why in ``note``.

Bad requests get a 4xx ``{"error": "..."}`` naming the problem (415 not multipart,
400 missing field / empty / not an image / truncated, 413 too large), and every
request logs one line: method, path, status, milliseconds and what was scored.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from hiad_pl.data.sample import HRSample, ImageReadError, read_size
from hiad_pl.decisions import NG, NO_THRESHOLDS, Thresholds
from hiad_pl.deploy.files import map_png16, map_range, png_bytes
from hiad_pl.orchestrator import Prediction, TaskOrchestrator

log = logging.getLogger("hiad_pl.serve")

MAP_FORMATS = ("png", "npy")

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class ServeConfig:
    """How the service batches and what it accepts.

    Args:
        threshold: image-score threshold of the decision, overriding the run's
            (``None``: the run's stored image threshold; a run without one answers
            ``label: null``).
        max_batch_size: most images scored together.
        max_wait_ms: how long the first image of a batch waits for more.
        max_upload_mb: largest accepted upload (413 beyond).
        max_pixels: largest accepted image (width x height; 413 beyond).
    """

    threshold: float | None = None
    max_batch_size: int = 4
    max_wait_ms: float = 10.0
    max_upload_mb: float = 64.0
    max_pixels: int = 8192 * 8192

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_wait_ms < 0 or self.max_upload_mb <= 0 or self.max_pixels <= 0:
            raise ValueError("max_wait_ms must be >= 0, max_upload_mb and max_pixels positive")


class RunScorer:
    """A fitted category model, loaded once: the one place where the service scores images.

    Args:
        orchestrator: a loaded :class:`TaskOrchestrator`.
        device: where its detectors are.
        image_size: detection resolution images are resized to (``None``: as received).
        category: the model's category name.
        thresholds: the model's image and pixel thresholds (``None``: no decisions).
    """

    def __init__(
        self, orchestrator: TaskOrchestrator, device: str, image_size: tuple[int, int] | None, category: str | None,
        thresholds: Thresholds | None = None,
    ) -> None:
        self.orchestrator = orchestrator
        self.thresholds = thresholds
        self.device = device
        self.image_size = image_size
        self.category = category
        mains = [i.main_index for t in orchestrator.tasks for i in t.indexes]
        #: ``(width, height)`` the patch indexes cover; smaller images cannot be scored.
        self.extent = (max((m.x + m.width for m in mains), default=1), max((m.y + m.height for m in mains), default=1))

    @staticmethod
    def from_run(run_dir: str | Path, category: str | None = None, devices: Sequence[int | str] = ()) -> RunScorer:
        """Load a run folder written by ``hiad-pl fit`` (as ``hiad-pl predict`` does)."""
        from hiad_pl.engine.runs import load_run

        run = load_run(Path(run_dir), category, devices)
        return RunScorer(run.orchestrator, run.device, run.image_size, run.category, run.thresholds)

    @property
    def normalized(self) -> bool:
        """Whether scores lie in [0, 1] (every task has validation statistics)."""
        return self.orchestrator.normalized

    def sample(self, path: str | Path) -> HRSample:
        """An image file as a sample at the detection resolution, decoded now; raises ImageReadError or ValueError."""
        sample = HRSample(path, image_size=self.image_size, clsname=self.category)
        width, height = sample.image_size
        if width < self.extent[0] or height < self.extent[1]:
            raise ValueError(
                f"image size {width}x{height} is smaller than the {self.extent[0]}x{self.extent[1]} "
                "area the model's patch indexes cover"
            )
        sample.image.open()
        return sample

    def score(self, samples: Sequence[HRSample]) -> list[Prediction]:
        """Anomaly maps and image scores of decoded samples, their patches batched together."""
        pipeline = self.orchestrator.pipeline(self.device, prefetch=0, images_per_step=max(1, len(samples)))
        return list(pipeline.predict(samples))


class BatchingQueue(Generic[Item, Result]):
    """Groups concurrent submissions into batches for one scoring function.

    The first item of a batch waits at most ``max_wait_s`` for others; a batch
    holds at most ``max_batch_size`` items. ``score`` runs in one worker thread,
    so the event loop keeps accepting requests meanwhile. An exception fails
    every item of its batch, and the queue carries on.
    """

    def __init__(self, score: Callable[[list[Item]], list[Result]], max_batch_size: int, max_wait_s: float) -> None:
        self.score = score
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future]] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hiad-score")

    async def submit(self, item: Item) -> tuple[Result, int]:
        """The item's result and the size of the batch it was scored in."""
        if self._queue is None:
            raise RuntimeError("the batching queue is not running")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def run(self) -> None:
        """Serve batches until cancelled."""
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        try:
            while True:
                batch = [await self._queue.get()]
                deadline = loop.time() + self.max_wait_s
                while len(batch) < self.max_batch_size:
                    remaining = deadline - loop.time()
                    if remaining <= 0 and self._queue.empty():
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), max(remaining, 0)))
                    except asyncio.TimeoutError:
                        break
                await self._score(loop, batch)
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _score(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[Item, asyncio.Future]]) -> None:
        try:
            results = await loop.run_in_executor(self._executor, self.score, [item for item, _ in batch])
        except Exception as error:  # noqa: BLE001 - handed to every waiting request
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result((result, len(batch)))


class RequestError(Exception):
    """A request the service refuses: an HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def encode_map(anomaly_map: np.ndarray, normalized: bool, map_format: str) -> dict[str, Any]:
    """The response fields of a map: 16-bit PNG over ``map_min..map_max``, or exact float32 ``.npy``."""
    if map_format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, anomaly_map.astype(np.float32))
        return {"anomaly_map_npy": base64.b64encode(buffer.getvalue()).decode("ascii")}
    vmin, vmax = map_range(anomaly_map, normalized)
    png = png_bytes(map_png16(anomaly_map, vmin, vmax))
    return {"anomaly_map_png": base64.b64encode(png).decode("ascii"), "map_min": vmin, "map_max": vmax}


def decode_upload(scorer: RunScorer, data: bytes, filename: str, max_pixels: int) -> HRSample:
    """Decode uploaded bytes into a sample; a :class:`RequestError` names what is wrong with them."""
    suffix = Path(filename).suffix.lower() or ".png"
    with tempfile.TemporaryDirectory(prefix="hiad-serve-") as folder:
        path = Path(folder) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            width, height = read_size(path)
            if width * height > max_pixels:
                raise RequestError(413, f"{filename}: image of {width}x{height} pixels exceeds max_pixels={max_pixels}")
            return scorer.sample(path)
        except ImageReadError as error:
            message = str(error).replace(str(path), filename)
            if "truncated" not in message and "unreadable image" in message:
                message = message.replace("unreadable image", "not an image (or an unsupported format)")
            raise RequestError(400, message) from None
        except ValueError as error:
            raise RequestError(422, f"{filename}: {error}") from None


def create_app(scorer: RunScorer, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI application serving ``scorer``."""
    config = config or ServeConfig()
    stored = scorer.thresholds
    threshold = config.threshold if config.threshold is not None else (None if stored is None else stored.image)
    pixel_threshold = None if stored is None else stored.pixel
    rule = "given" if config.threshold is not None else (None if stored is None else stored.rule)
    note = None if stored is not None else NO_THRESHOLDS + (" (the image threshold is --threshold)" if threshold is not None else "")
    if note is not None:
        log.warning("%s", note)
    queue: BatchingQueue[HRSample, Prediction] = BatchingQueue(
        scorer.score, config.max_batch_size, config.max_wait_ms / 1000
    )
    max_bytes = int(config.max_upload_mb * 2**20)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = asyncio.create_task(queue.run())
        yield
        worker.cancel()

    app = FastAPI(title="hiad-pl", lifespan=lifespan)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.middleware("http")
    async def log_request(request: Request, call_next: Callable) -> Any:
        start = time.perf_counter()
        request.state.detail = ""
        response = await call_next(request)
        elapsed = (time.perf_counter() - start) * 1000
        log.info("%s %s %d %.1f ms %s", request.method, request.url.path, response.status_code, elapsed, request.state.detail)
        return response

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        request.state.detail = f"error={exc.message!r}"
        return error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        request.state.detail = f"error={exc.detail!r}"
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        request.state.detail = f"error={problems!r}"
        return error(422, problems)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "category": scorer.category,
            "image_size": None if scorer.image_size is None else list(scorer.image_size),
            "tasks": [t.name for t in scorer.orchestrator.tasks],
            "device": scorer.device,
            "normalized": scorer.normalized,
            "threshold": threshold,
            "pixel_threshold": pixel_threshold,
            "threshold_rule": rule,
            "scale": None if stored is None else stored.scale,
            **({"note": note} if note else {}),
            "max_batch_size": config.max_batch_size,
            "max_wait_ms": config.max_wait_ms,
        }

    @app.post("/predict")
    async def predict(
        request: Request, with_map: bool = Query(False, alias="map"), map_format: str = "png",
        with_mask: bool = Query(False, alias="mask"),
    ) -> dict[str, Any]:
        if map_format not in MAP_FORMATS:
            raise RequestError(422, f"map_format must be one of {list(MAP_FORMATS)}, got {map_format!r}")
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise RequestError(
                415,
                "POST /predict takes multipart/form-data with a file field 'image', "
                f"got content-type {content_type or 'none'!r}",
            )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes + 65536:
            raise RequestError(413, f"upload of {int(length)} bytes exceeds max_upload_mb={config.max_upload_mb:g}")
        form = await request.form()
        upload = form.get("image")
        if upload is None:
            raise RequestError(400, f"no multipart field 'image' (fields sent: {sorted(form.keys())})")
        if not isinstance(upload, UploadFile):
            raise RequestError(400, "field 'image' must be a file upload, not a text value")
        data = await upload.read()
        filename = upload.filename or "image"
        if not data:
            raise RequestError(400, f"{filename}: empty file")
        if len(data) > max_bytes:
            raise RequestError(413, f"{filename}: {len(data)} bytes exceed max_upload_mb={config.max_upload_mb:g}")
        sample = await run_in_threadpool(decode_upload, scorer, data, filename, config.max_pixels)
        try:
            prediction, batch_size = await queue.submit(sample)
        except Exception as failure:  # noqa: BLE001 - a scoring failure is the server's, not the request's
            log.exception("scoring %s failed", filename)
            raise RequestError(500, f"{filename}: scoring failed ({failure})") from None
        label = None if threshold is None else (NG if prediction.score > threshold else "OK")
        body: dict[str, Any] = {
            "image_score": prediction.score,
            "label": label,
            "is_anomalous": None if label is None else label == NG,
            "threshold": threshold,
            "pixel_threshold": pixel_threshold,
            "threshold_rule": rule,
            "normalized": scorer.normalized,
            "batch_size": batch_size,
        }
        if note is not None:
            body["note"] = note
        if with_map:
            body.update(encode_map(prediction.anomaly_map.numpy(), scorer.normalized, map_format))
        if with_mask:
            mask = None if stored is None else stored.mask(prediction.anomaly_map.numpy())
            body["mask_png"] = None if mask is None else base64.b64encode(png_bytes(mask)).decode("ascii")
        request.state.detail = f"image={filename!r} score={prediction.score:.6f} label={label} batch={batch_size}"
        return body

    return app


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class Service:
    """A uvicorn server for an app, run in the foreground (:meth:`run`) or a background thread (:meth:`start`)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 1473) -> None:
        import uvicorn

        self.host, self.port = host, int(port)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning", access_log=False))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def run(self) -> None:
        """Serve until interrupted (Ctrl-C)."""
        self.server.run()

    def start(self, timeout_s: float = 60.0) -> Service:
        """Serve in a daemon thread; returns once the server listens."""
        self._thread = threading.Thread(target=self.server.run, name="hiad-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start on {self.url} (port in use?)")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop a server started with :meth:`start`."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    run_dir: str | Path,
    category: str | None = None,
    host: str = "127.0.0.1",
    port: int = 1473,
    devices: Sequence[int | str] = (),
    config: ServeConfig | None = None,
) -> None:
    """``hiad-pl serve``: load the run once and serve it until interrupted."""
    logging.getLogger("hiad_pl").setLevel(logging.INFO)
    scorer = RunScorer.from_run(run_dir, category, devices)
    service = Service(create_app(scorer, config), host, port)
    print(f"serving {run_dir} ({scorer.category}, {len(scorer.orchestrator.tasks)} tasks, {scorer.device}) on {service.url}", flush=True)
    service.run()



def serve_parser() -> Any:
    """The arguments of ``hiad-pl serve``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(description="Serve a fitted run over HTTP (GET /health, POST /predict)")
    parser.add_argument("--run_dir", type=str, required=True, help="A folder written by `hiad-pl fit`")
    parser.add_argument("--category", type=str | None, default=None, help="Category model to serve (when the run has several)")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="Address to listen on")
    parser.add_argument("--port", type=int, default=1473, help="TCP port")
    parser.add_argument("--devices", type=list[int | str], default=[], help="GPU ids; [] = CPU")
    parser.add_argument("--threshold", type=float | None, default=None,
                        help="Image-score threshold of the OK/NG decision (default: the run's, from thresholds.json)")
    parser.add_argument("--max_batch_size", type=int, default=4, help="Most concurrent images scored together")
    parser.add_argument("--max_wait_ms", type=float, default=10.0, help="How long a batch waits for more images")
    parser.add_argument("--max_upload_mb", type=float, default=64.0, help="Largest accepted upload")
    parser.add_argument("--max_pixels", type=int, default=8192 * 8192, help="Largest accepted image (width x height)")
    return parser


def serve_command(args: Any) -> None:
    """Run ``hiad-pl serve`` with parsed arguments."""
    config = ServeConfig(args.threshold, args.max_batch_size, args.max_wait_ms, args.max_upload_mb, args.max_pixels)
    serve(args.run_dir, args.category, args.host, args.port, args.devices, config)
