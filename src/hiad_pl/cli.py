"""``hiad-pl``: fit, test, predict, tasks, demo-data, detectors, serve, export.

The parser is built from the classes, with jsonargparse (the machinery of LightningCLI):
``detector`` takes any :class:`~hiad_pl.detectors.base.HRDetector` subclass by name or
import path with its typed, documented options (``--detector.help HRPatchCore``),
``tasks`` any task generator, ``trainer`` ``lightning.Trainer``'s own arguments minus those
hiad-pl sets per task, and a misspelt option at any depth stops the parse, naming the valid
ones, before any data is read. ``--config`` takes a CLI config or one of the tutorial's flat
detector files (``configs/patchcore.yaml``); ``--print_config`` shows the resolved config.

Exit status: 0 done, 2 bad input, configuration or environment (one line naming
the file or key; see :mod:`hiad_pl.errors`), 1 internal error (the traceback
with ``--verbose true``), 130 stopped by Ctrl-C (SIGINT), 143 stopped by SIGTERM;
a stopped command prints one line with the command that resumes or reruns it
(see :mod:`hiad_pl.interrupts`).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import shlex
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from hiad_pl import __version__
from hiad_pl.config import (
    RESERVED_TRAINER_KEYS,
    DataConfig,
    EvaluationConfig,
    RayOptions,
    RunConfig,
    ThresholdSection,
    ThumbnailConfig,
    as_list,
    branch_config,
    detector_class_of,
    did_you_mean,
    import_class,
    load_detector_file,
)
from hiad_pl.data.synthesis import AnomalySynthesizer
from hiad_pl.errors import ConfigError, UserError
from hiad_pl.interrupts import Interrupted, stop_on_signals
from hiad_pl.private_apis import parser_destinations
from hiad_pl.utils.allocator import keep_freed_memory

DEFAULT_DETECTOR = "hiad_pl.detectors.HRPatchCore"
DEFAULT_TASKS = "hiad_pl.tasks.A2OTaskGenerator"


@dataclass
class ValidationSection:
    """A validation set of held-out training images with synthetic anomalies (the tutorial's val_config).

    Args:
        anomaly_syn_fn: the anomaly synthesiser, e.g. {class_path: hiad_pl.syn.RandomBoxSynthesizer, init_args: {p: 0.5}};
            null: no validation set.
        val_sample_ratio: share of the training images held out.
        max_patch_number: most validation patches per task (None: all).
        evaluators: evaluator import paths (or {function: path, kwargs: {...}}) shown per validation.
        normalization: "task" (each task its own statistics) or "shared" (patch tasks pool theirs).
    """

    anomaly_syn_fn: AnomalySynthesizer | None = None
    val_sample_ratio: float = 0.2
    max_patch_number: int | None = None
    evaluators: list[Any] | None = None
    normalization: Literal["task", "shared"] = "task"


def _accepted(path: str) -> list[str]:
    """The keyword arguments of the class at ``path`` (empty when it cannot be imported)."""
    try:
        parameters = inspect.signature(import_class(path)).parameters
    except (ValueError, TypeError):
        return []
    return [p for p in parameters if p not in ("self", "args", "kwargs")]


class HiadArgumentParser(ArgumentParser):
    """jsonargparse's parser whose errors also name the valid options of the misspelt one."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Exit with status 2, the message extended with the valid choices."""
        super().error(message + self._choices_hint(message), ex)

    def _choices_hint(self, message: str) -> str:
        unknown = re.search(r"Option '([\w.]+)' is not accepted", message)
        owner = re.findall(r"class_path '([\w.]+)'", message)
        if unknown and owner:
            valid = _accepted(owner[-1])
            return f"\n  valid options of {owner[-1]}: {', '.join(valid)}{did_you_mean(unknown.group(1), valid)}" if valid else ""
        key = re.search(r"does not accept option '([\w.]+)'|unrecognized arguments: --([\w.]+)", message)
        if not key:
            return ""
        name = key.group(1) or key.group(2)
        group, _, option = name.rpartition(".")
        prefix = f"{group}." if group else ""
        valid = sorted(
            {d[len(prefix):].split(".")[0] for d in _destinations(self) if d.startswith(prefix) and d != "help"}
        )
        return f"\n  valid options{' of ' + group if group else ''}: {', '.join(valid)}{did_you_mean(option, valid)}"


def _destinations(parser: ArgumentParser) -> list[str]:
    """Every option key of a parser and its subcommands' parsers (subcommand name left out)."""
    return parser_destinations(parser)


def flat_detector_file(value: Any) -> dict[str, Any] | None:
    """A tutorial detector file (flat options with ``class_path``) as a CLI config, else ``None``.

    Its HiAD option names are translated and checked against the detector's signature;
    ``patch_size`` goes to ``data``, HiAD's step counters to ``trainer``.
    """
    path = Path(str(value))
    if path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
        return None
    content = load_detector_file(path)
    if "class_path" not in content or "detector" in content:
        return None
    cls = detector_class_of(content["class_path"])
    branch = branch_config(cls, content, str(path))
    run: dict[str, Any] = {"detector": {"class_path": content["class_path"], "init_args": branch.options}}
    if branch.size is not None:
        run["data"] = {"patch_size": branch.size}
    if branch.trainer:
        run["trainer"] = branch.trainer
    return run


class RunConfigFile(ActionConfigFile):
    """``--config``: a CLI config, or a tutorial detector file whose other settings come from defaults and flags."""

    # jsonargparse calls its actions with its own parser and Namespace, narrower than argparse.Action declares
    def __call__(  # type: ignore[override]
        self, parser: ArgumentParser, cfg: Namespace, values: Any, option_string: str | None = None
    ) -> None:
        try:
            run = flat_detector_file(values)
        except ValueError as error:
            parser.error(str(error))
        if run is None:
            super().__call__(parser, cfg, values, option_string)
        else:
            self.apply_config(parser, cfg, self.dest, yaml.safe_dump(run))


def _run_arguments(parser: ArgumentParser) -> None:
    import lightning

    # from the packages, which import every subclass: they are then known by name (--detector HRPaDiM)
    from hiad_pl.detectors import HRDetector
    from hiad_pl.tasks import TaskGenerator

    parser.add_argument("--config", action=RunConfigFile, help="YAML config: a CLI config or a detector file (configs/)")
    parser.add_argument("--run_dir", type=str, default="runs/default", help="Run folder: checkpoints, logs, metrics")
    parser.add_class_arguments(DataConfig, "data")
    parser.add_subclass_arguments(
        HRDetector, "detector", default={"class_path": DEFAULT_DETECTOR}, required=False,
        help="Detector: any HRDetector subclass by name or import path; its options: --detector.help NAME",
    )
    parser.add_subclass_arguments(
        TaskGenerator, "tasks", default={"class_path": DEFAULT_TASKS}, required=False,
        help="Task generator: which patches each detector learns; its options: --tasks.help NAME",
    )
    parser.add_class_arguments(ThumbnailConfig, "thumbnail")
    parser.add_class_arguments(ValidationSection, "validation", instantiate=False)
    parser.add_class_arguments(EvaluationConfig, "evaluation")
    parser.add_class_arguments(ThresholdSection, "threshold", instantiate=False)
    parser.add_class_arguments(lightning.Trainer, "trainer", skip=set(RESERVED_TRAINER_KEYS), instantiate=False)
    parser.add_argument("--devices", type=list[int | str] | int | str, default=[],
                        help="GPU ids, or 'cpu' entries for CPU processes; [] = one CPU")
    parser.add_argument("--seed", type=int, default=0, help="Random seed of every task's fit")
    parser.add_argument("--fusion_weights", type=list[float] | None, default=None,
                        help="Feature fusion weights, one per ds_factor (patch itself first)")
    parser.add_argument("--early_stop_epochs", type=int, default=-1,
                        help="Stop after this many validations without improvement (-1: never)")
    parser.add_argument("--resume", type=bool, default=True,
                        help="Skip fitted tasks and continue interrupted ones; false refuses a folder with checkpoints")
    parser.add_argument("--launcher", type=Literal["local", "ray"], default="local",
                        help="Where task fits and test scoring run: local processes, or a Ray cluster")
    parser.add_class_arguments(RayOptions, "ray")
    # Values that follow from others: shown by --print_config, never set twice.
    parser.link_arguments("data.patch_size", "detector.init_args.input_size")
    parser.link_arguments("fusion_weights", "detector.init_args.fusion_weights")
    parser.link_arguments("devices", "tasks.init_args.device", compute_fn=as_list)
    parser.link_arguments("data.batch_size", "tasks.init_args.batch_size")
    parser.link_arguments("fusion_weights", "tasks.init_args.fusion_weights")
    parser.link_arguments("detector.class_path", "tasks.init_args.detector_class")
    parser.link_arguments("detector.init_args", "tasks.init_args.detector_config", compute_fn=_plain_dict)


def _plain_dict(value: Any) -> dict[str, Any]:
    """A namespace (a detector's init_args) as a dict."""
    return value.as_dict() if isinstance(value, Namespace) else dict(value or {})


def build_parser() -> ArgumentParser:
    """The ``hiad-pl`` argument parser with its subcommands."""
    parser = HiadArgumentParser(prog="hiad-pl", allow_abbrev=False, description="High-resolution industrial image anomaly detection")
    parser.add_argument("--version", action="version", version=f"hiad-pl {__version__}")
    parser.add_argument("--verbose", type=bool, default=False, help="Log progress details")
    commands = parser.add_subcommands(required=True)

    for name, help_text in (
        ("fit", "Fit one detector per task for every category (a rerun resumes)"),
        ("test", "Evaluate a fitted run: metrics table, metrics.json, visualisations"),
        ("tasks", "Print the task layout of a config without training"),
    ):
        sub = HiadArgumentParser(allow_abbrev=False, description=help_text)
        _run_arguments(sub)
        if name == "fit":
            sub.add_argument(
                "--refit", type=bool, default=False,
                help="Discard the run folder's models and results and fit again (needed when settings changed)",
            )
        commands.add_subcommand(name, sub, help=help_text)

    predict = HiadArgumentParser(allow_abbrev=False, description="Score new images with a fitted run")
    predict.add_argument("--run_dir", type=str | None, default=None, help="A folder written by `hiad-pl fit`")
    predict.add_argument("--export", type=str | None, default=None,
                         help="A folder written by `hiad-pl export` (scored with onnxruntime, no torch), instead of --run_dir")
    predict.add_argument("--input", type=str, nargs="+", required=True, help="Image files or folders")
    predict.add_argument("--output", type=str, required=True, help="Folder for maps, overlays and scores.csv")
    predict.add_argument("--category", type=str | None, default=None, help="Category model to use (when the run has several)")
    predict.add_argument("--devices", type=list[int | str] | int | str, default=[], help="GPU ids; [] = CPU")
    predict.add_argument("--strict", type=bool, default=False,
                         help="Stop at the first unreadable image (default: skip it, report it, score the rest)")
    commands.add_subcommand("predict", predict, help="Score new images with a fitted run")

    from hiad_pl.deploy.export import export_parser
    from hiad_pl.serve import serve_parser

    commands.add_subcommand("serve", serve_parser(), help="Serve a fitted run over HTTP")
    commands.add_subcommand("export", export_parser(), help="Export a fitted run to ONNX graphs and a manifest")

    demo = HiadArgumentParser(allow_abbrev=False, description="Write the procedural high-resolution demo data set")
    demo.add_argument("--root", type=str, default="demo_data", help="Output folder")
    demo.add_argument("--categories", type=list[str] | str | None, default=None,
                      help="Categories, one name or a list (default: texture, object)")
    demo.add_argument("--image_size", type=int, default=2048, help="Image side in pixels")
    demo.add_argument("--seed", type=int, default=0, help="Random seed")
    demo.add_argument("--overwrite", type=bool, default=False, help="Rewrite categories that exist")
    commands.add_subcommand("demo-data", demo, help="Write the procedural demo data set")

    listing = ArgumentParser(description="List the registered detectors, one line each")
    listing.add_argument("--modules", type=str, nargs="*", default=[], help="Modules to import first (your own detectors)")
    commands.add_subcommand("detectors", listing, help="List the registered detectors")
    return parser


def trainer_options(parsed: dict[str, Any]) -> dict[str, Any]:
    """The Trainer options a config sets: those at Lightning's default give way to the detector's defaults."""
    import lightning

    defaults = {name: p.default for name, p in inspect.signature(lightning.Trainer).parameters.items()}
    return {k: v for k, v in parsed.items() if k not in defaults or v != defaults[k]}


def to_run_config(cfg: Namespace) -> RunConfig:
    """Parsed namespace -> :class:`~hiad_pl.config.RunConfig`, its detector settings checked."""
    plain = cfg.as_dict()
    plain["trainer"] = trainer_options(plain.get("trainer") or {})
    config = RunConfig.from_dict(plain)
    config.detectors  # noqa: B018  (checks the thumbnail's options before any data is read)
    return config


def save_config(cfg: Namespace, run_dir: Path) -> None:
    """Write the resolved config to ``run_dir/config.yaml`` (atomically)."""
    from hiad_pl.run_folder import atomic_write

    plain = cfg.as_dict()
    plain.pop("config", None)
    plain.pop("refit", None)  # an order to this run, not a setting: the saved config must not refit again
    atomic_write(run_dir / "config.yaml", yaml.safe_dump(plain, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hiad-pl``."""
    parser = build_parser()
    cfg = parse_arguments(parser, argv)
    logging.basicConfig(level=logging.INFO if cfg.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("hiad_pl").setLevel(logging.INFO)
    if not cfg.verbose:  # Lightning's device banners on every task (its product tips are dropped at their source)
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    command = cfg.subcommand
    sub = cfg[command]
    keep_freed_memory()
    # the HTTP server handles its own signals (a graceful shutdown)
    stopping = contextlib.nullcontext() if command == "serve" else stop_on_signals()
    try:
        with stopping:
            return _run(command, sub)
    except UserError as error:
        return report_error(command, error, verbose=cfg.verbose, internal=False)
    except Interrupted as stop:
        print(stopped_line(command, stop.signal_name, argv, sub), file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        print(stopped_line(command, "SIGINT", argv, sub), file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the last resort of the entry point
        return report_error(command, error, verbose=cfg.verbose, internal=True)


def stopped_line(command: str, signal_name: str, argv: list[str] | None, sub: Namespace) -> str:
    """The one line of a command stopped by a signal: what was kept and the command to continue."""
    args = argv if argv is not None else sys.argv[1:]
    rerun = rerun_command(args, refit_in_config=bool(getattr(sub, "refit", False)))
    if command == "fit":
        return (
            f"hiad-pl fit: stopped by {signal_name}; the fitted tasks and the last epoch checkpoints are kept; "
            f"resume with: {rerun}"
        )
    return f"hiad-pl {command}: stopped by {signal_name}; rerun with: {rerun}"


def rerun_command(args: list[str], refit_in_config: bool = False) -> str:
    """``hiad-pl`` with ``args`` less ``--refit`` / ``--resume`` (a resumed fit must not discard or refuse what was done)."""
    kept: list[str] = []
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
            if arg.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                continue
        name = arg.split("=", 1)[0]
        if name in ("--refit", "--resume"):
            skip_value = "=" not in arg
            continue
        kept.append(arg)
    if refit_in_config:
        kept += ["--refit", "false"]
    return shlex.join(["hiad-pl", *kept])


def _run(command: str, sub: Namespace) -> int:
    """Run one subcommand; exceptions are reported by :func:`main`."""
    if command == "demo-data":
        from hiad_pl.demo import make_demo_dataset

        summary = make_demo_dataset(
            sub.root, categories=as_list(sub.categories), image_size=sub.image_size, seed=sub.seed,
            overwrite=sub.overwrite,
        )
        for name, info in summary["categories"].items():
            state = "already present" if info["skipped"] else "written"
            defects = sum(info["test_defect"].values())
            print(f"{sub.root}/{name}: {info['train']} train, {info['test_good']} good + {defects} defective test images ({state})")
    elif command == "detectors":
        from hiad_pl import commands

        print("\n".join(commands.list_detectors(sub.modules)))
    elif command == "predict":
        if (sub.run_dir is None) == (sub.export is None):
            raise ConfigError("give either --run_dir (a fitted run) or --export (an exported model)")
        if sub.export is not None:
            from hiad_pl.deploy.predictor import predict_export

            out = predict_export(Path(sub.export), sub.input, Path(sub.output))
        else:
            from hiad_pl import commands

            out = commands.predict(Path(sub.run_dir), sub.input, Path(sub.output), sub.category, as_list(sub.devices) or (), sub.strict)
        print(f"predictions written to {out}")
    elif command == "serve":
        from hiad_pl.serve import serve_command

        serve_command(sub)
    elif command == "export":
        from hiad_pl.deploy.export import export_command

        print(f"exported to {export_command(sub)}")
    else:
        from hiad_pl import commands

        config = to_run_config(sub)
        if command == "tasks":
            commands.print_tasks(config)
        elif command == "fit":
            from hiad_pl.engine.run_folder import run_folder_lock

            with run_folder_lock(config.run_dir):
                commands.check_fit(config)  # a refused fit leaves the folder's config.yaml as it was
                save_config(sub, config.run_dir)
                run_dir = commands.fit(config)
            print(f"run folder: {run_dir}")
        elif command == "test":
            commands.test(config)
            print(f"metrics written to {config.run_dir / 'metrics.md'}")
    return 0


def parse_arguments(parser: ArgumentParser, argv: list[str] | None) -> Namespace:
    """Parse ``argv``; a parsing error is printed as one line (after the usage) and exits with status 2."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parser.parse_args(argv)
    except SystemExit as exit_:
        text = captured.getvalue()
        head, found, message = text.partition("error:")
        if exit_.code and found:
            sys.stderr.write(head)
            print(f"{parser.prog}: error: {' '.join(message.split())}", file=sys.stderr)
        else:
            sys.stderr.write(text)
        raise


def report_error(command: str, error: BaseException, verbose: bool, internal: bool) -> int:
    """Print ``error`` in one line (with the traceback when ``verbose``); returns the exit status.

    Status 2 is an error of input or configuration, 1 an internal error.
    """
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    message = " ".join(str(error).split()) or type(error).__name__
    if internal:
        hint = "" if verbose else " (rerun with --verbose true for the traceback)"
        print(f"hiad-pl {command}: internal error: {type(error).__name__}: {message}{hint}", file=sys.stderr)
        return 1
    print(f"hiad-pl {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
