"""The fidelity table: every config's effective settings against the original HiAD's.

``tests/fidelity_table.yaml`` holds, per file in ``configs/``, the original's values of
:data:`SETTINGS` (and of the detector options it names) and every deliberate difference
with its reason. :func:`effective_settings` reads a config the way ``hiad-pl fit`` does
(translation of HiAD's option names, links, defaults) and reports the same settings;
``tests/test_fidelity.py`` compares the two, and :func:`render` writes the table as
Markdown for ``docs/fidelity.md`` (``python tests/fidelity.py > /tmp/table.md``).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import shlex
import sys
from pathlib import Path
from typing import Any

import timm
import yaml

from hiad_pl.cli import main, trainer_options
from hiad_pl.config import RunConfig, import_class
from hiad_pl.data.synthesis import build_synthesizer
from hiad_pl.detectors.backbones import resolve_backbone_name

PROJECT = Path(__file__).resolve().parents[1]
TABLE = PROJECT / "tests" / "fidelity_table.yaml"
DOCS = PROJECT / "docs" / "fidelity.md"

#: Settings every row gives; ``detector`` and ``thumbnail_detector`` name options of their own.
SETTINGS = (
    "seed",
    "image_size",
    "patch_size",
    "batch_size",
    "ds_factors",
    "fusion_weights",
    "thumbnail_size",
    "tasks",
    "validation",
    "early_stop_epochs",
    "eval_every_steps",
    "backbone",
    "layers",
    "anomaly_source",
)
#: Marker of the table's rows that inherit the original values of another row.
BASE = "base"


def load_table() -> dict[str, dict[str, Any]]:
    """The table's rows by config file name, each with the original values of its base filled in."""
    rows = yaml.safe_load(TABLE.read_text(encoding="utf-8"))["configs"]
    for row in rows.values():
        if BASE in row:
            base = rows[row[BASE]]
            row["original"] = {**base["original"], **row.get("original", {})}
            row.setdefault("source", base["source"])
    return rows


def parsed_config(argv: list[str]) -> dict[str, Any]:
    """``hiad-pl fit ARGV --print_config`` as a dict (the CLI's translation, links and defaults)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(["fit", *argv, "--data.root", "/any/data", "--print_config"])
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise RuntimeError(f"hiad-pl fit {' '.join(argv)} --print_config exited with {stop.code}") from None
    return yaml.safe_load(out.getvalue())


def backbone_weights(name: str, weights: str) -> str:
    """The timm model and pretrained tag ``name`` resolves to (no download), or how else its weights come."""
    if weights != "hub":
        return f"{name} ({weights})"
    resolved = resolve_backbone_name(name)
    cfg = timm.models.get_pretrained_cfg(resolved)
    hub_id = getattr(cfg, "hf_hub_id", None) or resolved
    return hub_id.removeprefix("timm/")


def _signature_default(cls: type, name: str) -> Any:
    parameter = inspect.signature(cls).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _plain(value: Any) -> Any:
    """Tuples as lists and integral floats kept as they are, so values compare as YAML writes them."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _tasks(spec: dict[str, Any]) -> str:
    name = spec["class_path"].rpartition(".")[2]
    init = spec.get("init_args") or {}
    for key in ("cluster_number", "num_groups_width"):
        if key in init:
            return f"{name}({init[key]})"
    return name


def _validation(run: RunConfig) -> dict[str, Any] | None:
    """The validation set a fit builds: the configured one, or the orchestrator's default for a thumbnail branch."""
    from hiad_pl.orchestrator import default_validation

    section = run.validation or {}
    spec = section.get("anomaly_syn_fn")
    if spec is None:
        if run.detectors.thumbnail is None:
            return None
        default = default_validation()
        synth = default.anomaly_syn_fn
        return {
            "synthesizer": type(synth).__name__, "p": synth.p, "diff_threshold": list(synth.diff_threshold),
            "val_sample_ratio": default.val_sample_ratio, "max_patch_number": default.max_patch_number,
        }
    cls = import_class(spec["class_path"])
    init = spec.get("init_args") or {}
    return {
        "synthesizer": spec["class_path"].rpartition(".")[2],
        "p": init.get("p", _signature_default(cls, "p")),
        "diff_threshold": _plain(init.get("diff_threshold", _signature_default(cls, "diff_threshold"))),
        "val_sample_ratio": section.get("val_sample_ratio"),
        "max_patch_number": section.get("max_patch_number"),
    }


def _eval_every(run: RunConfig, options: dict[str, Any]) -> int | None:
    """Steps between validations as the orchestrator sets them (``None``: once per epoch)."""
    trainer = {**run.detectors.patch.trainer, **trainer_options(run.trainer)}
    if trainer.get("val_check_interval") is not None and trainer.get("check_val_every_n_epoch", 1) is None:
        return int(trainer["val_check_interval"])
    return options.get("eval_every")  # the step-counted ViT detectors' own default


def _default_synthesizers() -> dict[str, Any]:
    """The training corruption each detector uses when its config gives none."""
    from hiad_pl.data.synthesis import SimplexNoiseSynthesizer
    from hiad_pl.detectors.destseg import default_destseg_synthesizer
    from hiad_pl.detectors.realnet import default_realnet_synthesizer

    return {"HRDesTSeg": default_destseg_synthesizer, "HRRealNet": default_realnet_synthesizer, "HRRDPP": SimplexNoiseSynthesizer}


def _anomaly_source(cls: type, options: dict[str, Any]) -> str | None:
    """Where training anomalies come from: ``folder`` or ``procedural`` textures, another synthesiser's name, or ``None``."""
    if "synthesizer" not in inspect.signature(cls).parameters:
        return None
    spec = options.get("synthesizer")
    synth = build_synthesizer(spec) if spec is not None else _default_synthesizers()[cls.__name__]()
    return getattr(synth, "texture_source", type(synth).__name__)


def effective_settings(argv: list[str]) -> dict[str, Any]:
    """The settings a fit started with ``hiad-pl fit ARGV`` runs with, under :data:`SETTINGS`' names.

    ``detector`` and ``thumbnail_detector`` hold every option of the patch and the
    thumbnail branch (given or defaulted).
    """
    run = RunConfig.from_dict(parsed_config(argv))
    detectors = run.detectors
    cls = detectors.detector_class
    defaults = {name: _signature_default(cls, name) for name in inspect.signature(cls).parameters}
    options = {**defaults, **detectors.patch.options}
    thumbnail = detectors.thumbnail
    return {
        "seed": run.seed,
        "image_size": run.data.image_size,
        "patch_size": run.data.patch_size,
        "batch_size": run.data.batch_size,
        "ds_factors": run.data.ds_factors,
        "fusion_weights": run.fusion_weights,
        "thumbnail_size": None if thumbnail is None else thumbnail.size,
        "tasks": _tasks(run.tasks),
        "validation": _validation(run),
        "early_stop_epochs": run.early_stop_epochs,
        "eval_every_steps": _eval_every(run, options),
        "backbone": backbone_weights(options["backbone_name"], options["weights"]),
        "layers": list(options["layers_to_extract_from"]),
        "anomaly_source": _anomaly_source(cls, options),
        "detector": _plain(options),
        "thumbnail_detector": _plain({**defaults, **thumbnail.options}) if thumbnail is not None else None,
    }


def command(name: str, row: dict[str, Any]) -> list[str]:
    """The ``hiad-pl fit`` arguments of a row: ``--config configs/NAME`` unless the row gives its own."""
    return [str(a) for a in row.get("command", ["--config", f"configs/{name}"])]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return _text(str(value))


def _text(text: str) -> str:
    """Text for a Markdown table cell: pipes and angle brackets escaped."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def render(rows: dict[str, dict[str, Any]]) -> str:
    """The table as Markdown: per config, the original's settings and every difference with its reason."""
    lines: list[str] = []
    for name, row in rows.items():
        lines += [f"### `configs/{name}`", "", f"{_text(row['title'])}. Original: {_text(row['source'])}."]
        if "command" in row:
            lines += ["", "Run as: `hiad-pl fit " + shlex.join(command(name, row)) + "`"]
        lines += ["", "| setting | original | here | why |", "|---|---|---|---|"]
        differences = row.get("differences", {})
        original = row["original"]
        for key in (*SETTINGS, *(f"detector.{k}" for k in original.get("detector", {})),
                    *(f"thumbnail_detector.{k}" for k in original.get("thumbnail_detector", {}) or {})):
            group, _, option = key.partition(".")
            value = original[group][option] if option else original[key]
            if key in differences:
                diff = differences[key]
                lines.append(f"| {key} | {_cell(value)} | **{_cell(diff['ours'])}** | {_text(diff['reason'])} |")
            else:
                lines.append(f"| {key} | {_cell(value)} | same | |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render(load_table()))
