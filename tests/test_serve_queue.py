"""The service's batching queue and upload checks, without a model."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from hiad_pl.serve import BatchingQueue, RequestError, decode_upload


def test_batching_queue_groups_concurrent_items_and_survives_a_failing_batch() -> None:
    seen: list[list[int]] = []

    def score(items: list[int]) -> list[int]:
        seen.append(items)
        if -1 in items:
            raise RuntimeError("bad batch")
        return [10 * item for item in items]

    async def scenario() -> tuple[list, list]:
        queue = BatchingQueue(score, max_batch_size=3, max_wait_s=0.2)
        worker = asyncio.create_task(queue.run())
        await asyncio.sleep(0)
        first = await asyncio.gather(*(queue.submit(k) for k in range(5)))
        failed = await asyncio.gather(queue.submit(-1), return_exceptions=True)
        after = await queue.submit(7)
        worker.cancel()
        return first, [failed[0], after]

    first, (failed, after) = asyncio.run(scenario())
    assert [result for result, _ in first] == [0, 10, 20, 30, 40]
    assert [len(batch) for batch in seen[:2]] == [3, 2] and [size for _, size in first] == [3, 3, 3, 2, 2]
    assert isinstance(failed, RuntimeError) and after == (70, 1)


def test_an_image_over_max_pixels_is_refused_before_decoding() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(buffer, format="PNG")
    with pytest.raises(RequestError) as refused:
        decode_upload(None, buffer.getvalue(), "wide.png", max_pixels=1000)  # type: ignore[arg-type]
    assert refused.value.status == 413 and "50x40" in refused.value.message
