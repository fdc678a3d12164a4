"""Private attributes of torch, timm, torchmetrics and jsonargparse are used in hiad_pl.private_apis only."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hiad_pl"
GATED = PACKAGE / "private_apis.py"
#: The private names hiad-pl once used, and private module paths of the dependencies.
PRIVATE = re.compile(
    r"\._version\b|_convolution_pointwise|_stage_out_idx|feature_hooks|\._actions\b|_subcommands_action"
    r"|_name_parser_map|torchmetrics\.functional\.[\w.]*\._|\b_binary_\w+|timm\.models\._(?!builder\b)\w+"
)


def test_private_attributes_only_in_the_gated_module() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == GATED:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if PRIVATE.search(line.split("#", 1)[0]):
                found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not found, "private dependency attributes outside private_apis.py:\n" + "\n".join(found)


def test_the_gated_functions_work_on_the_installed_releases() -> None:
    import torch
    from jsonargparse import ArgumentParser

    from hiad_pl import private_apis

    t = torch.zeros(2)
    before = private_apis.tensor_version(t)
    t.add_(1)
    assert before is not None and private_apis.tensor_version(t) == before + 1
    parser = ArgumentParser()
    parser.add_argument("--alpha", type=int)
    assert "alpha" in private_apis.parser_destinations(parser)
