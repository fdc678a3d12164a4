"""Detectors register themselves: built-in and user detectors by short name, class name and dotted path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hiad_pl.cli import main
from hiad_pl.config import detector_class_of
from hiad_pl.detectors import DETECTORS, HRRDPP, HRDetector, get_detector, register_detector

USER_MODULE = '''
"""A user's own detector, outside the package."""
import torch
from hiad_pl.detectors import HRDetector


class HRBrightness(HRDetector):
    """Scores each pixel by its brightness (a toy)."""

    def anomaly_map(self, batch):
        return batch.image.mean(1)
'''


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_detectors.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_detectors"
    sys.modules.pop("my_detectors", None)
    DETECTORS.pop("brightness", None)


def test_built_in_detectors_are_registered_without_a_list() -> None:
    assert {"patchcore", "padim", "fastflow", "rdpp"} <= set(DETECTORS)
    assert get_detector("rdpp") is get_detector("HRRDPP") is detector_class_of("rdpp") is HRRDPP
    assert "HRDetector" not in {cls.__name__ for cls in DETECTORS.values()}  # abstract classes stay out


def test_a_user_detector_is_found_by_dotted_path_and_then_by_the_registry(user_module: str) -> None:
    assert "brightness" not in DETECTORS
    cls = get_detector(f"{user_module}.HRBrightness")
    assert issubclass(cls, HRDetector) and DETECTORS["brightness"] is cls
    assert get_detector("brightness") is cls and detector_class_of("HRBrightness") is cls


def test_hiad_pl_detectors_lists_one_line_each(user_module: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["detectors", "--modules", user_module]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    by_name = {line.split()[0]: line for line in lines}
    assert len(lines) == len(by_name) == len(DETECTORS)
    assert "hiad_pl.detectors.rdpp.HRRDPP" in by_name["rdpp"] and "reverse distillation" in by_name["rdpp"]
    assert f"{user_module}.HRBrightness" in by_name["brightness"] and "brightness" in by_name["brightness"].lower()
    assert main(["detectors", "--modules", "no_such_module_here"]) == 2


def test_a_taken_name_is_refused() -> None:
    class HRRDPP(HRDetector):  # same short name as the built-in, other module path
        detector_name = "taken_probe"

        def anomaly_map(self, batch):
            return batch.image.mean(1)

    try:
        with pytest.raises(ValueError, match="detector name 'rdpp'.*taken by hiad_pl.detectors.rdpp.HRRDPP"):
            register_detector(HRRDPP, "rdpp")
    finally:
        DETECTORS.pop("taken_probe", None)
