"""Every config's effective settings against the original HiAD's, as the fidelity table lists them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch

from fidelity import DOCS, PROJECT, SETTINGS, command, effective_settings, load_table, render
from hiad_pl.detectors.backbones import resolve_backbone_name

CONFIGS = sorted((PROJECT / "configs").glob("*.yaml"))
TABLE = load_table()


def test_every_config_has_a_row_and_every_row_a_config() -> None:
    assert {p.name for p in CONFIGS} == set(TABLE)


def _value(settings: dict[str, Any], key: str) -> Any:
    group, _, option = key.partition(".")
    return settings[group][option] if option else settings[group]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_effective_settings_are_the_originals_or_a_listed_difference(path: Path) -> None:
    row = TABLE.get(path.name)
    assert row is not None, f"configs/{path.name} has no row in tests/fidelity_table.yaml"
    argv = command(path.name, row)
    assert f"configs/{path.name}" in argv
    original, differences = row["original"], row.get("differences", {})
    effective = effective_settings(argv)
    keys = [*SETTINGS, *(f"detector.{k}" for k in original.get("detector", {}))]
    assert set(SETTINGS) <= set(original), f"{path.name}: the row lacks {sorted(set(SETTINGS) - set(original))}"
    assert set(differences) <= {*keys, "thumbnail_detector"}, f"{path.name}: differences name unknown settings"
    for key in keys:
        want, have = _value(original, key), _value(effective, key)
        if key in differences:
            assert differences[key]["reason"].strip(), f"{path.name}: {key} differs without a reason"
            assert have == differences[key]["ours"], f"{path.name}: {key} is {have!r}, the table says ours is {differences[key]['ours']!r}"
            assert have != want, f"{path.name}: {key} now equals the original's {want!r}: drop the difference"
        else:
            assert have == want, f"{path.name}: {key} is {have!r}, the original's is {want!r}, and no difference is listed"
    thumbnail = original.get("thumbnail_detector")
    if thumbnail is not None:
        if "thumbnail_detector" in differences:
            assert effective["thumbnail_detector"] is None and differences["thumbnail_detector"]["reason"].strip()
        else:
            assert effective["thumbnail_detector"] is not None, f"{path.name}: the original runs a thumbnail branch"
            for option, want in thumbnail.items():
                assert effective["thumbnail_detector"][option] == want, f"{path.name}: thumbnail {option}"


def test_docs_show_the_table() -> None:
    assert render(TABLE) in DOCS.read_text(encoding="utf-8"), "docs/fidelity.md is stale: python tests/fidelity.py renders the table"


@pytest.mark.parametrize(
    ("name", "timm_name", "tag"),
    [
        ("wideresnet50", "wide_resnet50_2.tv_in1k", "tv_in1k"),  # PatchCore, PaDiM, RD++: torchvision's weights
        ("resnet18.tv_in1k", "resnet18.tv_in1k", "tv_in1k"),  # DeSTSeg's teacher
        ("wide_resnet50_2", "wide_resnet50_2", "racm_in1k"),  # FastFlow and RealNet: timm's default, as the original
        ("vit_base_patch16_dinov3.lvd1689m", "vit_base_patch16_dinov3.lvd1689m", "lvd1689m"),
    ],
)
def test_backbone_names_resolve_to_the_originals_weights(name: str, timm_name: str, tag: str) -> None:
    resolved = resolve_backbone_name(name)
    assert resolved == timm_name
    with torch.device("meta"):  # the model timm would load hub weights into, without downloading them
        model = timm.create_model(resolved, pretrained=False)
    assert model.pretrained_cfg["tag"] == tag
    assert model.pretrained_cfg["hf_hub_id"] == f"timm/{resolved.partition('.')[0]}.{tag}"
