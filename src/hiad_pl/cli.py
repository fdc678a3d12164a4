"""``hiad-pl``: fit, test, predict, tasks, demo-data, detectors.

Configs are YAML files with ``class_path``/``init_args`` for the detector and the
task generator; every option can also be given on the command line
(``--data.batch_size 4``) and ``--print_config`` shows the resolved config.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from hiad_pl import __version__


def _run_arguments(parser: ArgumentParser) -> None:
    from hiad_pl.jobs import DataConfig, EvaluationConfig

    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file (see configs/)")
    parser.add_argument("--run_dir", type=str, default="runs/default", help="Run folder: checkpoints, logs, metrics")
    parser.add_class_arguments(DataConfig, "data")
    parser.add_argument("--detector", type=dict, default={"class_path": "hiad_pl.detectors.HRPatchCore"},
                        help="Detector: {class_path: hiad_pl.detectors.HRPatchCore, init_args: {...}}")
    parser.add_argument("--tasks", type=dict, default={"class_path": "hiad_pl.tasks.A2OTaskGenerator"},
                        help="Task generator: {class_path: ..., init_args: {...}}")
    parser.add_argument("--thumbnail", type=dict | None, default=None,
                        help="Low-resolution branch: {thumbnail_size: 256, ...detector options that differ}")
    parser.add_argument("--validation", type=dict | None, default=None,
                        help="Validation set: {anomaly_syn_fn: {class_path, init_args}, val_sample_ratio, max_patch_number, evaluators}")
    parser.add_class_arguments(EvaluationConfig, "evaluation")
    parser.add_argument("--trainer", type=dict, default={}, help="lightning.Trainer options (override detector defaults)")
    parser.add_argument("--devices", type=list[int | str], default=[], help="GPU ids, or 'cpu' entries for CPU processes; [] = one CPU")
    parser.add_argument("--seed", type=int, default=0, help="Random seed of every task's fit")
    parser.add_argument("--fusion_weights", type=list[float] | None, default=None,
                        help="Feature fusion weights, one per ds_factor (patch itself first)")
    parser.add_argument("--early_stop_epochs", type=int, default=-1,
                        help="Stop after this many validations without improvement (-1: never)")
    parser.add_argument("--resume", type=bool, default=True,
                        help="Skip fitted tasks and continue interrupted ones; false refuses a folder with checkpoints")


def build_parser() -> ArgumentParser:
    """The ``hiad-pl`` argument parser with its subcommands."""
    parser = ArgumentParser(prog="hiad-pl", description="High-resolution industrial image anomaly detection")
    parser.add_argument("--version", action="version", version=f"hiad-pl {__version__}")
    parser.add_argument("--verbose", type=bool, default=False, help="Log progress details")
    commands = parser.add_subcommands(required=True)

    for name, help_text in (
        ("fit", "Fit one detector per task for every category (a rerun resumes)"),
        ("test", "Evaluate a fitted run: metrics table, metrics.json, visualisations"),
        ("tasks", "Print the task layout of a config without training"),
    ):
        sub = ArgumentParser(description=help_text)
        _run_arguments(sub)
        commands.add_subcommand(name, sub, help=help_text)

    predict = ArgumentParser(description="Score new images with a fitted run")
    predict.add_argument("--run_dir", type=str, required=True, help="A folder written by `hiad-pl fit`")
    predict.add_argument("--input", type=str, nargs="+", required=True, help="Image files or folders")
    predict.add_argument("--output", type=str, required=True, help="Folder for maps, overlays and scores.csv")
    predict.add_argument("--category", type=str | None, default=None, help="Category model to use (when the run has several)")
    predict.add_argument("--devices", type=list[int | str], default=[], help="GPU ids; [] = CPU")
    commands.add_subcommand("predict", predict, help="Score new images with a fitted run")

    demo = ArgumentParser(description="Write the procedural high-resolution demo data set")
    demo.add_argument("--root", type=str, default="demo_data", help="Output folder")
    demo.add_argument("--categories", type=list[str] | None, default=None, help="Categories (default: texture, object)")
    demo.add_argument("--image_size", type=int, default=2048, help="Image side in pixels")
    demo.add_argument("--seed", type=int, default=0, help="Random seed")
    demo.add_argument("--overwrite", type=bool, default=False, help="Rewrite categories that exist")
    commands.add_subcommand("demo-data", demo, help="Write the procedural demo data set")

    listing = ArgumentParser(description="List the registered detectors, one line each")
    listing.add_argument("--modules", type=str, nargs="*", default=[], help="Modules to import first (your own detectors)")
    commands.add_subcommand("detectors", listing, help="List the registered detectors")
    return parser


def to_run_config(cfg: Namespace) -> Any:
    """Parsed namespace -> :class:`~hiad_pl.jobs.RunConfig`."""
    from hiad_pl.jobs import DataConfig, EvaluationConfig, RunConfig

    plain = cfg.as_dict()
    return RunConfig(
        run_dir=Path(plain["run_dir"]),
        data=DataConfig(**plain["data"]),
        detector=plain["detector"],
        tasks=plain["tasks"],
        thumbnail=plain.get("thumbnail"),
        validation=plain.get("validation"),
        evaluation=EvaluationConfig(**plain["evaluation"]),
        trainer=plain.get("trainer") or {},
        devices=plain.get("devices") or [],
        seed=plain["seed"],
        fusion_weights=plain.get("fusion_weights"),
        early_stop_epochs=plain["early_stop_epochs"],
        resume=plain["resume"],
    )


def save_config(cfg: Namespace, run_dir: Path) -> None:
    """Write the resolved config to ``run_dir/config.yaml`` (atomically)."""
    from hiad_pl.tasks.base import atomic_write_text

    plain = cfg.as_dict()
    plain.pop("config", None)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(plain, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hiad-pl``."""
    parser = build_parser()
    cfg = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if cfg.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("hiad_pl").setLevel(logging.INFO)
    if not cfg.verbose:  # device banners and tips from Lightning on every task
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    command = cfg.subcommand
    sub = cfg[command]
    try:
        if command == "demo-data":
            from hiad_pl.data.demo import make_demo_dataset

            summary = make_demo_dataset(
                sub.root, categories=sub.categories, image_size=sub.image_size, seed=sub.seed, overwrite=sub.overwrite
            )
            for name, info in summary["categories"].items():
                state = "already present" if info["skipped"] else "written"
                defects = sum(info["test_defect"].values())
                print(f"{sub.root}/{name}: {info['train']} train, {info['test_good']} good + {defects} defective test images ({state})")
        elif command == "detectors":
            from hiad_pl import jobs

            print("\n".join(jobs.list_detectors(sub.modules)))
        elif command == "predict":
            from hiad_pl import jobs

            out = jobs.predict(Path(sub.run_dir), sub.input, Path(sub.output), sub.category, sub.devices)
            print(f"predictions written to {out}")
        else:
            from hiad_pl import jobs

            config = to_run_config(sub)
            if command == "tasks":
                jobs.print_tasks(config)
            elif command == "fit":
                save_config(sub, config.run_dir)
                run_dir = jobs.fit(config)
                print(f"run folder: {run_dir}")
            elif command == "test":
                jobs.test(config)
                print(f"metrics written to {config.run_dir / 'metrics.md'}")
    except (ValueError, RuntimeError, OSError) as error:
        print(f"hiad-pl {command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
