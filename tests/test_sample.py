"""Reading samples: formats, bit depths, channels, masks, and errors that name the file."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from hiad_pl.data.sample import ImageReadError, read_image
from hiad_pl.utils.split_and_gather import HRSample, MultiResolutionHRImageSpliter

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff"])
def test_lossless_formats_read_exactly(tmp_path, suffix):
    path = tmp_path / f"a{suffix}"
    Image.fromarray(RGB).save(path)
    np.testing.assert_array_equal(read_image(path), RGB)


def test_jpeg_reads_close(tmp_path):
    path = tmp_path / "a.jpg"
    smooth = np.broadcast_to(np.linspace(0, 255, 60, dtype=np.uint8)[None, :, None], (40, 60, 3)).copy()
    Image.fromarray(smooth).save(path, quality=100)
    out = read_image(path)
    assert out.shape == smooth.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - smooth).mean() < 2


def test_16bit_grayscale_png_and_tiff_scale_to_8bit(tmp_path):
    gray16 = (np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16)
    png = tmp_path / "g16.png"
    Image.fromarray(gray16).save(png)
    tif = tmp_path / "g16.tif"
    tifffile.imwrite(tif, gray16)
    for path in (png, tif):
        out = read_image(path)
        assert out.shape == (40, 60, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out[..., 0], (gray16 >> 8).astype(np.uint8))
        np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_16bit_rgb_tiff(tmp_path):
    rgb16 = RGB.astype(np.uint16) * 257
    path = tmp_path / "rgb16.tif"
    tifffile.imwrite(path, rgb16, photometric="rgb")
    np.testing.assert_array_equal(read_image(path), RGB)


def test_single_channel_and_rgba(tmp_path):
    gray = RGB[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (40, 60, 3)
    np.testing.assert_array_equal(out[..., 1], gray)
    rgba = np.concatenate([RGB, np.full((40, 60, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), RGB)


def test_mask_is_binarised(tmp_path):
    mask = np.zeros((40, 60), np.uint8)
    mask[5:9, 5:9] = 1
    mask[20:22, 30:40] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = read_image(tmp_path / "m.png", mask=True)
    assert set(np.unique(out)) == {0, 1}
    assert out.sum() == 16 + 20


def test_errors_name_the_file(tmp_path):
    with pytest.raises(ImageReadError, match="missing.png: file not found"):
        read_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="junk.png: unreadable"):
        read_image(junk)
    full = tmp_path / "full.png"
    Image.fromarray(RNG.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageReadError, match="cut.png: truncated"):
        read_image(cut)


def test_mask_size_mismatch_names_both_files(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "img_mask.png")
    with pytest.raises(ImageReadError, match=r"img_mask.png: mask size 10x10 differs from image .*img.png size 60x40"):
        HRSample(image=str(tmp_path / "img.png"), mask=str(tmp_path / "img_mask.png"))


def test_sample_is_lazy_and_crops_patches_with_low_resolution(tmp_path):
    image = RNG.integers(0, 256, (128, 256, 3), dtype=np.uint8)
    mask = np.zeros((128, 256), np.uint8)
    mask[10:20, 200:210] = 255
    Image.fromarray(image).save(tmp_path / "x.png")
    Image.fromarray(mask).save(tmp_path / "x_mask.png")
    sample = HRSample(image=str(tmp_path / "x.png"), mask=str(tmp_path / "x_mask.png"), image_size=(256, 128))
    assert sample.image.image is None  # nothing decoded yet
    indexes = MultiResolutionHRImageSpliter((256, 128), 64, ds_factors=[0, 1])
    with sample:
        patch = sample[indexes[3]]
        np.testing.assert_array_equal(patch.image, image[0:64, 192:256])
        assert patch.mask.sum() == 100 and patch.mask.max() == 1
        assert len(patch.low_resolution_images) == 1
        assert patch.low_resolution_images[0].shape == (64, 64, 3)
        assert patch.low_resolution_indexes[0].width == 32
        assert sample.resolved_label() == 1
        thumb = sample.down_sampling_to_LR(32)
        assert thumb.image.shape == (32, 32, 3)
    assert sample.image.image is None  # released


def test_image_size_resizes(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "r.png")
    for size, shape in ((30, (30, 30, 3)), ((20, 10), (10, 20, 3))):
        with HRSample(image=str(tmp_path / "r.png"), image_size=size) as sample:
            assert sample.image.open().shape == shape
