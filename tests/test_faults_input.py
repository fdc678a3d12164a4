"""Bad input and configuration: exit status 2, one line naming the file or key, no traceback."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_config
from hiad_pl.cli import main


def error_lines(err: str) -> list[str]:
    """The lines of stderr that report an error (one expected)."""
    return [line for line in err.splitlines() if "error:" in line]


def assert_user_error(status: int, err: str, *names: str) -> str:
    """Status 2, no traceback, and one error line that names each of ``names``."""
    assert status == 2, err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def fitted_run(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PatchCore run folder fitted on the small demo's texture category, at 256 px in one patch (quick)."""
    work = tmp_path_factory.mktemp("fitted")
    data = {"root": str(small_demo), "categories": ["texture"], "image_size": 256, "patch_size": 256, "batch_size": 4}
    config = write_config(work, small_demo, data=data, tasks={"class_path": "hiad_pl.tasks.A2OTaskGenerator"})
    assert main(["fit", "--config", str(config)]) == 0
    return work / "run"


@pytest.fixture(scope="module")
def odd_images(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Readable but unusual images (16-bit TIFF, grayscale, RGBA) and truncated PNG / JPEG files."""
    import tifffile

    folder = tmp_path_factory.mktemp("odd")
    source = small_demo / "texture" / "test" / "good" / "000.png"
    rgb = np.asarray(Image.open(source).convert("RGB"))
    paths = {name: folder / name for name in ("a_good.png", "b_16bit.tif", "c_gray.png", "d_rgba.png", "e_cut.png", "f_cut.jpg")}
    shutil.copy(source, paths["a_good.png"])
    tifffile.imwrite(paths["b_16bit.tif"], rgb.astype(np.uint16) * 257)
    Image.fromarray(rgb).convert("L").save(paths["c_gray.png"])
    Image.fromarray(rgb).convert("RGBA").save(paths["d_rgba.png"])
    png = source.read_bytes()
    paths["e_cut.png"].write_bytes(png[: len(png) // 2])
    Image.fromarray(rgb).save(folder / "full.jpg", quality=90)
    jpeg = (folder / "full.jpg").read_bytes()
    (folder / "full.jpg").unlink()
    paths["f_cut.jpg"].write_bytes(jpeg[: len(jpeg) // 3])
    return paths


def scores_rows(path: Path) -> list[dict[str, str]]:
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# scores:")
    return list(csv.DictReader(line for line in lines if not line.startswith("#")))


def test_predict_skips_unreadable_images_scores_the_rest_and_fails_at_the_end(
    fitted_run: Path, odd_images: dict[str, Path], tmp_path: Path, capsys, caplog
) -> None:
    folder = odd_images["a_good.png"].parent
    status = main(["predict", "--run_dir", str(fitted_run), "--input", str(folder), "--output", str(tmp_path)])
    err = capsys.readouterr().err
    line = assert_user_error(status, err, "2 of 6 image(s) could not be scored", "e_cut.png", "scores.csv")
    assert "truncated" in line
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(skipped) == 2 and "e_cut.png" in skipped[0] and "f_cut.jpg" in skipped[1]  # each named in the log
    rows = {Path(row["image"]).name: row for row in scores_rows(tmp_path / "scores.csv")}
    assert sorted(rows) == sorted(odd_images)
    for name in ("a_good.png", "b_16bit.tif", "c_gray.png", "d_rgba.png"):
        assert rows[name]["error"] == "" and float(rows[name]["score"]) >= 0.0, rows[name]
        assert (tmp_path / rows[name]["map"]).is_file()
    for name in ("e_cut.png", "f_cut.jpg"):
        assert name in rows[name]["error"] and rows[name]["score"] == ""
    # the 16-bit TIFF is the same picture as the 8-bit PNG, at 16 bits
    assert float(rows["b_16bit.tif"]["score"]) == pytest.approx(float(rows["a_good.png"]["score"]), rel=1e-4)


def test_predict_strict_stops_at_the_first_unreadable_image(
    fitted_run: Path, odd_images: dict[str, Path], tmp_path: Path, capsys
) -> None:
    inputs = [str(odd_images[name]) for name in ("a_good.png", "e_cut.png", "c_gray.png")]
    status = main(["predict", "--run_dir", str(fitted_run), "--input", *inputs, "--output", str(tmp_path), "--strict", "true"])
    assert_user_error(status, capsys.readouterr().err, "e_cut.png", "truncated")
    rows = scores_rows(tmp_path / "scores.csv")
    assert [Path(row["image"]).name for row in rows] == ["a_good.png"]  # what was scored before the stop is kept


def category_copy(small_demo: Path, tmp_path: Path) -> Path:
    """A writable copy of the texture category under ``tmp_path/data``."""
    root = tmp_path / "data"
    shutil.copytree(small_demo / "texture", root / "texture")
    return root


def test_mask_of_another_size_names_both_files(small_demo: Path, tmp_path: Path, capsys) -> None:
    root = category_copy(small_demo, tmp_path)
    mask = root / "texture" / "ground_truth" / "spot" / "000_mask.png"
    Image.new("L", (100, 80)).save(mask)
    config = str(write_config(tmp_path, root))
    assert main(["fit", "--config", config]) == 0  # fit reads no test image and no mask
    status = main(["test", "--config", config])  # test, which reads them, names the bad one
    assert_user_error(status, capsys.readouterr().err, str(mask), "100x80", "512x512")


def test_truncated_training_image_is_named(small_demo: Path, tmp_path: Path, capsys) -> None:
    root = category_copy(small_demo, tmp_path)
    image = root / "texture" / "train" / "good" / "001.png"
    image.write_bytes(image.read_bytes()[:2000])
    status = main(["fit", "--config", str(write_config(tmp_path, root))])
    assert_user_error(status, capsys.readouterr().err, str(image), "truncated")


@pytest.mark.parametrize(
    "case, names",
    [
        ("empty folder", ["empty", "empty or unrecognised data set"]),
        ("unknown category", ["'nosuch'", "not found", "available"]),
        ("wrong config type", ["data.batch_size", "four"]),
        ("image smaller than a patch", ["patch_size 1024x1024", "image_size 512x512"]),
        ("misspelt trainer option", ["trainer", "max_epoch"]),
    ],
)
def test_bad_data_or_config_is_one_line_with_status_2(small_demo: Path, tmp_path: Path, capsys, case: str, names: list[str]) -> None:
    data = {"root": str(small_demo), "categories": ["texture"], "image_size": 512, "patch_size": 256, "batch_size": 4}
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        data["root"] = str(tmp_path / "empty")
    elif case == "unknown category":
        data["categories"] = ["nosuch"]
    elif case == "wrong config type":
        data["batch_size"] = "four"
    elif case == "image smaller than a patch":
        data["patch_size"] = 1024
    trainer = {"max_epoch": 3} if case == "misspelt trainer option" else {}
    try:
        status = main(["fit", "--config", str(write_config(tmp_path, small_demo, data=data, trainer=trainer))])
    except SystemExit as exit_:  # argument parsing errors exit from the parser
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    assert any(all(name in line for name in names) for line in err.splitlines()), err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_hub_weights_offline_is_a_user_error(small_demo: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import timm

    original = timm.create_model

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("Network is unreachable")
        return original(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    detector = {
        "class_path": "hiad_pl.detectors.HRPatchCore",
        "init_args": {"backbone_name": "resnet18", "weights": "hub", "layers_to_extract_from": ["layer2", "layer3"]},
    }
    status = main(["fit", "--config", str(write_config(tmp_path, small_demo, detector=detector))])
    assert_user_error(status, capsys.readouterr().err, "resnet18", "weights: offline")


def test_internal_errors_exit_1_with_the_traceback_only_when_verbose(small_demo: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from hiad_pl import commands

    def broken(config):
        raise KeyError("a bug")

    monkeypatch.setattr(commands, "print_tasks", broken)
    config = str(write_config(tmp_path, small_demo))
    assert main(["tasks", "--config", config]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error: KeyError: 'a bug'" in err and "--verbose true" in err
    assert main(["--verbose", "true", "tasks", "--config", config]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bug",
    [ValueError("an internal check failed"), OSError(5, "an internal read failed"), TypeError("a wrong call")],
    ids=["ValueError", "OSError", "TypeError"],
)
def test_a_builtin_error_from_inside_is_internal_not_a_user_error(
    small_demo: Path, tmp_path: Path, capsys, monkeypatch, bug: Exception
) -> None:
    """Only UserError means bad input (status 2): a ValueError or OSError of hiad-pl's own code is a bug (status 1)."""
    from hiad_pl import commands

    def broken(config):
        raise bug

    monkeypatch.setattr(commands, "print_tasks", broken)
    assert main(["tasks", "--config", str(write_config(tmp_path, small_demo))]) == 1
    err = capsys.readouterr().err
    assert f"internal error: {type(bug).__name__}" in err, err


def test_the_error_types_of_bad_input_exit_2(small_demo: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """The project's input and configuration errors are user errors, whichever built-in they also derive from."""
    from hiad_pl import commands
    from hiad_pl.errors import ConfigError, MissingFileError

    config = str(write_config(tmp_path, small_demo))
    for error in (ConfigError("tasks: a bad value"), MissingFileError("weights.pth: no such file")):

        def broken(config, error=error):
            raise error

        monkeypatch.setattr(commands, "print_tasks", broken)
        assert_user_error(main(["tasks", "--config", config]), capsys.readouterr().err, str(error))


def test_a_detector_option_its_constructor_rejects_is_a_config_error(small_demo: Path, tmp_path: Path, capsys) -> None:
    """A value error raised by a detector's own checks names the detector and the task, status 2."""
    detector = {"class_path": "hiad_pl.detectors.HRPatchCore", "init_args": {"weights": "none", "percentage": 7.0}}
    status = main(["fit", "--config", str(write_config(tmp_path, small_demo, detector=detector))])
    assert_user_error(status, capsys.readouterr().err, "HRPatchCore", "task_0")
