"""Graph rewrites of a frozen CNN that leave its maps as they are and make it faster on the CPU.

Each rewrite runs a fixed sample through the model before and after, and undoes
itself (with a warning) when the outputs moved by more than :data:`FOLD_TOLERANCE`
of their range (:func:`drop_unused_blocks`: when they are not identical):

- :func:`drop_unused_blocks` stops an EfficientNet / MobileNet after the deepest requested layer;
- :func:`fold_batch_norms` folds each eval-mode BatchNorm into the convolution before it;
- :func:`symmetric_same_padding` computes TensorFlow-"same" convolutions without a padded copy
  (:class:`SymmetricSameConv2d`);
- :func:`fuse_conv_activations` runs an activation inside the convolution before it as a oneDNN
  post-operation (:class:`ConvActivation`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import FeatureInfo
from torch import Tensor, nn
from torch.nn.utils import fuse_conv_bn_weights

from hiad_pl.private_apis import convolution_pointwise, fused_convolution_available, tensor_version

log = logging.getLogger(__name__)


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


def _as_double(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach().double()


def fold_batch_norms(model: nn.Module, sample: Tensor) -> int:
    """Fold every eval-mode BatchNorm that follows a convolution into that convolution; the number folded.

    A frozen BatchNorm is a per-channel affine map, ``y = a * x + b``: scaling the
    convolution's output channels by ``a`` and adding ``b`` to its bias gives the
    same maps without a pass over every activation (EfficientNet-Lite0 runs
    15-20% faster on the CPU). The arithmetic is torch's
    (``torch.nn.utils.fuse_conv_bn_weights``), in float64 so that the folded
    weights are the exact ones rounded once. timm's BatchNorm-with-activation keeps
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
            weight, bias = fuse_conv_bn_weights(
                conv.weight.double(), _as_double(conv.bias), norm.running_mean.double(),
                norm.running_var.double(), norm.eps, _as_double(norm.weight), _as_double(norm.bias),
            )
            # in place: the convolution keeps its parameter object (and memory format)
            conv.weight.copy_(weight.to(conv.weight.dtype))
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


def _stages_returned(model: nn.Module) -> list[int] | None:
    """The ``stage`` of each layer a timm ``features_only`` model returns (its public ``feature_info``), or ``None``.

    timm's EfficientNet / MobileNet builder numbers stages so that stage ``k`` is
    the output of ``blocks[:k]`` (0: the stem); other models give no stages.
    """
    info = getattr(model, "feature_info", None)
    if not isinstance(info, FeatureInfo):
        return None
    stages = [entry.get("stage") for entry in info.get_dicts()]
    return stages if stages and all(isinstance(stage, int) for stage in stages) else None


def drop_unused_blocks(model: nn.Module, sample: Tensor) -> int:
    """Remove the trailing blocks whose outputs no requested layer needs; the number removed.

    timm's ``features_only`` EfficientNets and MobileNets (``EfficientNetFeatures``,
    ``MobileNetV3Features``) run every block even when the deepest requested layer
    is earlier (``blocks.2`` + ``blocks.4`` of EfficientNet-Lite0 ran ``blocks.5``
    and ``blocks.6`` too), and unlike timm's full models they have no
    ``prune_intermediate_layers``. Their ``feature_info`` says which stage each
    returned layer ends (stage ``k``: after ``blocks[:k]``), so the blocks after
    the deepest one go, as ``prune_intermediate_layers`` cuts a full model. The
    outputs on ``sample`` must stay identical; otherwise nothing is removed.
    """
    inner = getattr(model, "model", model)
    stages = _stages_returned(inner)
    blocks = getattr(inner, "blocks", None)
    if not stages or not isinstance(blocks, nn.Sequential):
        return 0
    keep = max(stages)
    if keep >= len(blocks):
        return 0
    with torch.no_grad():
        before = model(sample)
        inner.blocks = blocks[:keep]
        try:
            after = model(sample)
        except Exception as error:  # noqa: BLE001 - a forward that needs the dropped blocks keeps them
            after = error
    if isinstance(after, list) and len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(after, before)):
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
