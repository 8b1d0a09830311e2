"""Seeded random programs for fuzzing :func:`fx_lightning.fuse`.

:func:`generate` draws one small network from a seed: a few blocks of convolutions (1d/2d/3d, transposed,
functional, weight-standardised, parametrised, tied, shared), Linear layers and BatchNorm in every form torch,
torchvision and timm users write, joined by residual sums, concatenations, reshapes, in-place ops, constant scales,
hooks, children torch.fx cannot trace, and forwards that index, iterate or call parts of a child that gets
rewritten (``self.seq0[0](x)`` beside ``self.seq0(x)``). BatchNorm statistics and affine parameters are random,
so a wrong fold changes the output.

The network is a :class:`FuzzNet`, whose ``forward`` interprets a list of steps fixed at construction
(``y3 = self.conv1(y2)``, ``y4 = y3 * self.gamma0.view(1, -1, 1, 1)``): torch.fx traces it like hand-written code,
and ``Program.source`` prints every step as the line it runs and every member as the call that builds it.

Print a program, or only its first blocks to shrink a failure::

    python tests/fuzz_programs.py 17
    python tests/fuzz_programs.py 17 --max-ops 2
"""

from __future__ import annotations

import argparse
import copy
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm
from torchvision.ops import FrozenBatchNorm2d

#: Every feature a program can draw; ``Program.features`` names the ones it has.
FEATURES = frozenset(
    {
        # layers
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "ConvTranspose1d",
        "ConvTranspose2d",
        "padding=1",
        "padding=same",
        "padding=valid",
        "padding_mode=reflect",
        "padding_mode=circular",
        "stride=2",
        "dilation=2",
        "groups",
        "depthwise",
        "bias=False",
        "output_padding",
        "F.conv",
        "StdConv",
        "parametrize",
        "weight_norm",
        "tied weights",
        "shared conv",
        "Linear 2-D",
        "Linear 3-D + BatchNorm1d(flatten(0, 1))",
        "Linear 3-D + BatchNorm1d(L)",
        "F.linear",
        "unbatched conv",
        # BatchNorm forms
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "bn affine=False",
        "bn track_running_stats=False",
        "bn running-stats flag off",
        "SyncBatchNorm",
        "FrozenBatchNorm2d",
        "BatchNorm subclass",
        "BatchNormAct2d",
        "F.batch_norm",
        "shared bn",
        "bn before layer",
        # structure
        "residual",
        "residual +=",
        "branches",
        "cat",
        "reshape before bn",
        "constant scale",
        "gamma scale",
        "torch.mul(out=)",
        "mul_",
        "relu_",
        "ReLU(inplace=True)",
        "dropout",
        "avg_pool",
        "forward hook",
        "forward pre-hook",
        "root hook",
        "root pre-hook",
        "untraceable child",
        "indexes a child",
        "iterates a child",
        "calls a child's part",
        "reads bn weight",
        "reads layer weight",
        "weight.abs().sum()",
        "nested net",
        # how the program is fused
        "float64",
        "bfloat16",
        "channels_last",
        "train mode",
        "example_inputs",
        "fuse twice",
        "trace first",
    }
)


# ------------------------------------------------------------------------------------------ building blocks


class UnitNorm(nn.Module):
    """A weight parametrisation: every output filter scaled to unit norm."""

    def forward(self, weight: Tensor) -> Tensor:
        return weight / weight.flatten(1).norm(dim=1).view(-1, *[1] * (weight.dim() - 1))


class _Standardised:
    """Weight standardisation inside ``_conv_forward``, as timm's ``StdConv2d`` does it (with ``F.batch_norm``)."""

    out_channels: int

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        flat = weight.reshape(1, self.out_channels, -1)
        weight = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=1e-6).reshape_as(weight)
        return super()._conv_forward(input, weight, bias)  # type: ignore[misc]


class StdConv1d(_Standardised, nn.Conv1d):
    """Conv1d with a standardised weight."""


class StdConv2d(_Standardised, nn.Conv2d):
    """Conv2d with a standardised weight."""


class StdConv3d(_Standardised, nn.Conv3d):
    """Conv3d with a standardised weight."""


class PlainBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d subclass that keeps torch's forward."""


class BatchNormAct2d(nn.BatchNorm2d):
    """A BatchNorm2d that calls ``F.batch_norm`` itself and applies an activation, as timm's does."""

    def __init__(self, num_features: int, eps: float = 1e-5, act: bool = True) -> None:
        super().__init__(num_features, eps=eps)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        use_stats = not self.training or self.track_running_stats
        x = F.batch_norm(
            x,
            self.running_mean if use_stats else None,
            self.running_var if use_stats else None,
            self.weight,
            self.bias,
            self.training or self.running_mean is None,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
        )
        return self.act(x)


class ConvNorm(nn.Module):
    """A layer and the BatchNorm after it, as a child with ``.conv`` and ``.bn``."""

    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class DataDependentBlock(nn.Module):
    """Branches on tensor values, walks and indexes its children, reads a BatchNorm's weight: fx cannot trace it."""

    def __init__(self, seq: nn.Sequential, blk: ConvNorm, read_bn: bool = False) -> None:
        super().__init__()
        self.seq = seq
        self.blk = blk
        self.read_bn = read_bn

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            for layer in self.seq:
                x = layer(x)
        else:
            x = self.seq[len(self.seq) - 1](self.seq[0](x))
        if self.read_bn:
            x = x * self.blk.bn.weight.view(1, -1, *[1] * (x.dim() - 2))
        return self.blk(x)


def double_output(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    return output * 2


def halve_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0] * 0.5, *args[1:])


def with_forward_hook(module: nn.Module, hook: Callable[..., Any]) -> nn.Module:
    module.register_forward_hook(hook)
    return module


def with_forward_pre_hook(module: nn.Module, hook: Callable[..., Any]) -> nn.Module:
    module.register_forward_pre_hook(hook)
    return module


def running_stats_off(bn: nn.Module) -> nn.Module:
    """Switch ``track_running_stats`` off after construction, as Lightning's ``BaseFinetuning.freeze`` does."""
    bn.track_running_stats = False
    return bn


def parameter(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape))


def buffer(*shape: int) -> Tensor:
    return torch.zeros(shape)


# ------------------------------------------------------------------------------------------ calls and values

_DISPLAY_NAMES = {
    id(parametrize.register_parametrization): "parametrize.register_parametrization",
    id(weight_norm): "weight_norm",
}


def _display_name(fn: Callable[..., Any]) -> str:
    if id(fn) in _DISPLAY_NAMES:
        return _DISPLAY_NAMES[id(fn)]
    module = getattr(fn, "__module__", "") or ""
    if module.startswith("torch.nn.functional"):
        return f"F.{fn.__name__}"
    if module.startswith("torch.nn"):
        return f"nn.{fn.__name__}"
    return fn.__name__


@dataclass(frozen=True)
class Call:
    """A constructor call kept as data: it builds the object, and prints as the Python that builds it.

    ``init`` says how :meth:`build` randomises the result when given a generator: ``"layer"`` (conv/linear
    weights ~ N(0, 1/fan_in), biases ~ 0.1 N(0, 1)), ``"norm"`` (BatchNorm statistics and affine parameters), or a
    distribution for a single tensor (``"unit"``, ``"small"``, ``"fan_in"``).
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    init: str = ""

    def build(self, gen: torch.Generator | None) -> Any:
        value = self.fn(*(_build(a, gen) for a in self.args), **{k: _build(v, gen) for k, v in self.kwargs})
        if gen is not None and self.init:
            _randomise(value, self.init, gen)
        return value

    def render(self, indent: int = 0) -> str:
        parts = [_render(a, indent + 4) for a in self.args] + [f"{k}={_render(v, indent + 4)}" for k, v in self.kwargs]
        flat = f"{_display_name(self.fn)}({', '.join(parts)})"
        if len(flat) + indent <= 110 or not parts:
            return flat
        pad = " " * (indent + 4)
        return f"{_display_name(self.fn)}(\n" + "".join(f"{pad}{p},\n" for p in parts) + " " * indent + ")"


def call(fn: Callable[..., Any], *args: Any, init: str = "", **kwargs: Any) -> Call:
    return Call(fn, args, tuple(kwargs.items()), init)


def _build(value: Any, gen: torch.Generator | None) -> Any:
    if isinstance(value, Call):
        return value.build(gen)
    if isinstance(value, NetSpec):
        return FuzzNet(value, gen)
    return value


def _render(value: Any, indent: int = 0) -> str:
    if isinstance(value, Call):
        return value.render(indent)
    if isinstance(value, NetSpec):
        return f"{value.name}()"
    if callable(value):
        return _display_name(value)
    return repr(value)


_DISTRIBUTIONS = {"unit": "U(0.5, 1.5)", "small": "0.1 * N(0, 1)", "fan_in": "N(0, 1 / fan_in)"}


def _draw(shape: torch.Size, init: str, gen: torch.Generator) -> Tensor:
    if init == "unit":
        return torch.rand(shape, generator=gen) + 0.5
    if init == "small":
        return 0.1 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


@torch.no_grad()
def _randomise(value: Any, init: str, gen: torch.Generator) -> None:
    if init == "layer":
        for p in value.parameters(recurse=False):
            p.copy_(_draw(p.shape, "fan_in" if p.dim() > 1 else "small", gen))
    elif init == "norm":
        for name, dist in (("weight", "unit"), ("bias", "small"), ("running_mean", "small"), ("running_var", "unit")):
            t = getattr(value, name, None)
            if isinstance(t, Tensor):
                t.copy_(_draw(t.shape, dist, gen))
    else:
        value.copy_(_draw(value.shape, init, gen))


# ------------------------------------------------------------------------------------------ the interpreter


@dataclass(frozen=True)
class Step:
    """One line of a forward: ``out = op(*args, **attrs)``, looked up in ``_OPS``."""

    out: str
    op: str
    args: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        attrs = dict(self.attrs)
        fmt = _OPS[self.op][1]
        if callable(fmt):
            return fmt(self, **attrs)
        shown = {k: v if k in _RAW_ATTRS else _render(v) for k, v in attrs.items()}
        return fmt.format(*self.args, out=self.out, terms=" + ".join(self.args), seq=", ".join(self.args), **shown)


_RAW_ATTRS = frozenset({"module", "param", "fn"})


@dataclass
class NetSpec:
    """What a :class:`FuzzNet` is made of: members (attribute name -> constructor), steps, ties and hooks."""

    name: str
    members: list[tuple[str, Call | NetSpec]] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    output: str = "x"
    ties: list[tuple[str, str]] = field(default_factory=list)
    hooks: list[tuple[str, Callable[..., Any]]] = field(default_factory=list)  # ("forward" | "forward_pre", hook)


class FuzzNet(nn.Module):
    """A network whose forward interprets a list of steps fixed at construction, so torch.fx can trace it."""

    def __init__(self, spec: NetSpec, gen: torch.Generator | None = None) -> None:
        super().__init__()
        self.steps = tuple(spec.steps)
        self.output = spec.output
        for name, value in spec.members:
            built = _build(value, gen)
            if isinstance(built, (nn.Module, nn.Parameter)):
                setattr(self, name, built)
            else:
                self.register_buffer(name, built)
        for dst, src in spec.ties:
            self.get_submodule(dst).weight = self.get_submodule(src).weight
        for kind, hook in spec.hooks:
            getattr(self, f"register_{kind}_hook")(hook)

    def forward(self, x: Tensor) -> Tensor:
        env = {"x": x}
        for step in self.steps:
            env[step.out] = _OPS[step.op][0](self, *(env[a] for a in step.args), **dict(step.attrs))
        return env[self.output]


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "F.relu": F.relu,
    "F.silu": F.silu,
    "F.gelu": F.gelu,
    "F.hardswish": F.hardswish,
    "torch.tanh": torch.tanh,
}
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_POOL_FNS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _sum(net: nn.Module, *xs: Tensor) -> Tensor:
    out = xs[0]
    for t in xs[1:]:
        out = out + t
    return out


def _iadd(net: nn.Module, a: Tensor, b: Tensor) -> Tensor:
    a += b
    return a


def _iterate(net: nn.Module, a: Tensor, module: str) -> Tensor:
    for layer in getattr(net, module):
        a = layer(a)
    return a


def _part_text(step: Step, module: str, part: str) -> str:
    where = f"[{part}]" if part.isdigit() else f".{part}"
    return f"{step.out} = self.{module}{where}({step.args[0]})"


def _relu_(net: nn.Module, a: Tensor) -> Tensor:
    a.relu_()
    return a


def _mul_(net: nn.Module, a: Tensor, c: float) -> Tensor:
    a.mul_(c)
    return a


def _mul_out(net: nn.Module, a: Tensor, c: float) -> Tensor:
    out = torch.empty_like(a)
    torch.mul(a, c, out=out)
    return out


def _conv_f(net: nn.Module, a: Tensor, *, dims: int, weight: str, bias: str | None, **geometry: Any) -> Tensor:
    b = getattr(net, bias) if bias else None
    return _CONV_FNS[dims](
        a, getattr(net, weight), b, geometry["stride"], geometry["padding"], geometry["dilation"], geometry["groups"]
    )


def _conv_f_text(step: Step, *, dims: int, weight: str, bias: str | None, **geometry: Any) -> str:
    b = f"self.{bias}" if bias else "None"
    rest = ", ".join(repr(geometry[k]) for k in ("stride", "padding", "dilation", "groups"))
    return f"{step.out} = F.conv{dims}d({step.args[0]}, self.{weight}, {b}, {rest})"


def _linear_f(net: nn.Module, a: Tensor, *, weight: str, bias: str | None) -> Tensor:
    return F.linear(a, getattr(net, weight), getattr(net, bias) if bias else None)


def _linear_f_text(step: Step, *, weight: str, bias: str | None) -> str:
    return f"{step.out} = F.linear({step.args[0]}, self.{weight}, {f'self.{bias}' if bias else 'None'})"


def _bn_f(net: nn.Module, a: Tensor, *, prefix: str, affine: bool, eps: float) -> Tensor:
    weight = getattr(net, f"{prefix}_weight") if affine else None
    bias = getattr(net, f"{prefix}_bias") if affine else None
    return F.batch_norm(a, getattr(net, f"{prefix}_mean"), getattr(net, f"{prefix}_var"), weight, bias, False, 0.1, eps)


def _bn_f_text(step: Step, *, prefix: str, affine: bool, eps: float) -> str:
    affine_args = f"self.{prefix}_weight, self.{prefix}_bias" if affine else "None, None"
    stats = f"self.{prefix}_mean, self.{prefix}_var"
    return f"{step.out} = F.batch_norm({step.args[0]}, {stats}, {affine_args}, False, 0.1, {eps!r})"


def _read_weight(net: nn.Module, a: Tensor, x: Tensor, *, module: str, dims: int) -> Tensor:
    layer = getattr(net, module)
    return a + _CONV_FNS[dims](x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def _read_weight_text(step: Step, *, module: str, dims: int) -> str:
    fields = ", ".join(f"self.{module}.{k}" for k in ("weight", "bias", "stride", "padding", "dilation", "groups"))
    return f"{step.out} = {step.args[0]} + F.conv{dims}d({step.args[1]}, {fields})"


#: op name -> (function(net, *tensors, **attrs), the line it prints as: a format string or a function of the step)
_OPS: dict[str, tuple[Callable[..., Tensor], str | Callable[..., str]]] = {
    "call": (lambda net, a, module: getattr(net, module)(a), "{out} = self.{module}({0})"),
    "part": (lambda net, a, module, part: getattr(net, module).get_submodule(part)(a), _part_text),
    "iterate": (_iterate, "{out} = functools.reduce(lambda h, layer: layer(h), self.{module}, {0})"),
    "sum": (_sum, "{out} = {terms}"),
    "iadd": (_iadd, "{0} += {1}"),
    "relu_": (_relu_, "{0}.relu_()"),
    "mul_": (_mul_, "{0}.mul_({c})"),
    "mul_out": (_mul_out, "{out} = torch.empty_like({0}); torch.mul({0}, {c}, out={out})"),
    "scale": (lambda net, a, param, view: a * getattr(net, param).view(view), "{out} = {0} * self.{param}.view{view}"),
    "mul": (lambda net, a, c: a * c, "{out} = {0} * {c}"),
    "div": (lambda net, a, c: a / c, "{out} = {0} / {c}"),
    "shift": (lambda net, a, c: a + c, "{out} = {0} + {c}"),
    "act": (lambda net, a, fn: _ACTIVATIONS[fn](a), "{out} = {fn}({0})"),
    "dropout": (lambda net, a, p: F.dropout(a, p, net.training), "{out} = F.dropout({0}, {p}, self.training)"),
    "cat": (lambda net, *xs: torch.cat(list(xs), dim=1), "{out} = torch.cat([{seq}], dim=1)"),
    "reshape": (lambda net, a, shape: a.reshape(shape), "{out} = {0}.reshape{shape}"),
    "flatten": (lambda net, a, start, end: a.flatten(start, end), "{out} = {0}.flatten({start}, {end})"),
    "transpose": (lambda net, a, dims: a.transpose(*dims), "{out} = {0}.transpose{dims}"),
    "unsqueeze": (lambda net, a: a.unsqueeze(0), "{out} = {0}.unsqueeze(0)"),
    "mean": (lambda net, a, dims: a.mean(dims), "{out} = {0}.mean({dims})"),
    "pool": (lambda net, a, dims, k: _POOL_FNS[dims](a, k), "{out} = F.avg_pool{dims}d({0}, {k})"),
    "conv_f": (_conv_f, _conv_f_text),
    "linear_f": (_linear_f, _linear_f_text),
    "bn_f": (_bn_f, _bn_f_text),
    "read_weight": (_read_weight, _read_weight_text),
    "weight_abs": (
        lambda net, a, module: a + getattr(net, module).weight.abs().sum(),
        "{out} = {0} + self.{module}.weight.abs().sum()",
    ),
}


# ------------------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class Shape:
    """The value a step produces: ``conv`` (N, C, *spatial), ``unbatched`` (C, *spatial), ``flat`` (N, C),
    ``seq`` (N, L, C) with ``spatial == (L,)``."""

    layout: str
    batch: int
    channels: int
    spatial: tuple[int, ...] = ()

    @property
    def size(self) -> tuple[int, ...]:
        if self.layout == "unbatched":
            return (self.channels, *self.spatial)
        if self.layout == "seq":
            return (self.batch, *self.spatial, self.channels)
        return (self.batch, self.channels, *self.spatial)

    @property
    def dims(self) -> int:
        return len(self.spatial)

    @property
    def channel_view(self) -> tuple[int, ...]:
        """The view that broadcasts a per-channel vector over this value."""
        if self.layout == "unbatched":
            return (-1, *[1] * self.dims)
        return (1, -1, *[1] * self.dims)


@dataclass(frozen=True)
class Geometry:
    cin: int
    cout: int
    kernel: int
    stride: int = 1
    padding: int | str = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: int = 0

    def out_size(self, size: int) -> int:
        if self.transposed:
            return (
                (size - 1) * self.stride
                - 2 * int(self.padding)
                + self.dilation * (self.kernel - 1)
                + self.output_padding
                + 1
            )
        if self.padding == "same":
            return size
        pad = 0 if self.padding == "valid" else int(self.padding)
        return (size + 2 * pad - self.dilation * (self.kernel - 1) - 1) // self.stride + 1

    def side_padding(self) -> int:
        if self.padding == "same":
            total = self.dilation * (self.kernel - 1)
            return total - total // 2
        return 0 if self.padding == "valid" else int(self.padding)

    def weight_shape(self, dims: int) -> tuple[int, ...]:
        if self.transposed:
            return (self.cin, self.cout // self.groups, *[self.kernel] * dims)
        return (self.cout, self.cin // self.groups, *[self.kernel] * dims)

    def module_call(self, cls: Callable[..., Any]) -> Call:
        kwargs: dict[str, Any] = {}
        defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": True, "padding_mode": "zeros"}
        for name, default in defaults.items():
            if getattr(self, name) != default:
                kwargs[name] = getattr(self, name)
        if self.output_padding:
            kwargs["output_padding"] = self.output_padding
        return call(cls, self.cin, self.cout, self.kernel, init="layer", **kwargs)


@dataclass(frozen=True)
class Layer:
    """What :meth:`_Drawer.conv` made: the member name (``None`` for a functional call) and the kind of layer."""

    name: str | None
    kind: str


_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_STD_CONVS = {1: StdConv1d, 2: StdConv2d, 3: StdConv3d}
_TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}
_BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_AVG_POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}

#: BatchNorm form -> (weight, input ranks it accepts)
_NORM_FORMS: dict[str, tuple[float, tuple[int, ...]]] = {
    "bn": (0.34, (2, 3, 4, 5)),
    "affine=False": (0.07, (2, 3, 4, 5)),
    "track_running_stats=False": (0.07, (2, 3, 4, 5)),
    "running-stats flag off": (0.05, (2, 3, 4, 5)),
    "SyncBatchNorm": (0.07, (2, 3, 4, 5)),
    "subclass": (0.05, (4,)),
    "FrozenBatchNorm2d": (0.08, (4,)),
    "BatchNormAct2d": (0.1, (4,)),
    "F.batch_norm": (0.14, (2, 3, 4, 5)),
}
_BATCH_STATS_FORMS = frozenset({"track_running_stats=False"})
_AFFINE_MODULE_FORMS = frozenset(
    {"bn", "running-stats flag off", "SyncBatchNorm", "subclass", "FrozenBatchNorm2d", "BatchNormAct2d"}
)


# ------------------------------------------------------------------------------------------ drawing


class _Drawer:
    """Draws the members and steps of one :class:`NetSpec`, block by block, keeping track of the value's shape."""

    def __init__(
        self, rng: random.Random, spec: NetSpec, features: set[str], *, depth: int = 0, bfloat16: bool = False
    ) -> None:
        self.rng = rng
        self.bfloat16 = bfloat16  # CPU avg_pool3d has no bfloat16 kernel
        self.spec = spec
        self.features = features
        self.depth = depth
        self._counts: dict[str, int] = {}

    # -- bookkeeping

    def feature(self, name: str) -> None:
        if name not in FEATURES:
            raise KeyError(f"unknown fuzz feature {name!r}; add it to FEATURES")
        self.features.add(name)

    def name(self, stem: str) -> str:
        index = self._counts.get(stem, 0)
        self._counts[stem] = index + 1
        return f"{stem}{index}"

    def member(self, stem: str, value: Call | NetSpec) -> str:
        return self.member_as(self.name(stem), value)

    def member_as(self, name: str, value: Call | NetSpec) -> str:
        self.spec.members.append((name, value))
        return name

    def wrap(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        """Replace member ``name``'s constructor ``c`` with ``fn(c, *args)``."""
        index = next(i for i, (n, _) in enumerate(self.spec.members) if n == name)
        self.spec.members[index] = (name, call(fn, self.spec.members[index][1], *args))

    def step(self, op: str, *args: str, out: str | None = None, **attrs: Any) -> str:
        out = out or self.name("y")
        self.spec.steps.append(Step(out, op, args, tuple(attrs.items())))
        return out

    def weighted(self, options: dict[str, float]) -> str:
        names = list(options)
        return self.rng.choices(names, weights=[options[n] for n in names])[0]

    # -- layers

    def geometry(
        self, shape: Shape, cout: int | None = None, *, same: bool = False, transposed: bool = False
    ) -> Geometry:
        rng, cin, sizes = self.rng, shape.channels, shape.spatial
        for _ in range(40):
            out_channels, groups = self._channels(cin, cout)
            kernel = rng.choice((1, 2, 3, 3, 3))
            dilation = 2 if kernel > 1 and rng.random() < 0.2 else 1
            stride = 1 if same or rng.random() < 0.75 else 2
            bias = rng.random() < 0.6
            if transposed:
                padding: int | str = rng.choice((0, 1)) if kernel > 1 else 0
                extra = max(stride, dilation)
                output_padding = rng.randrange(extra) if extra > 1 else 0
                geo = Geometry(
                    cin,
                    out_channels,
                    kernel,
                    stride,
                    padding,
                    dilation,
                    groups,
                    bias,
                    transposed=True,
                    output_padding=output_padding,
                )
            else:
                if same:
                    padding = "same" if kernel % 2 == 0 or rng.random() < 0.5 else dilation * (kernel - 1) // 2
                else:
                    padding = rng.choice((0, 1, "same", "valid") if stride == 1 else (0, 1))
                mode = self.weighted({"zeros": 0.8, "reflect": 0.1, "circular": 0.1})
                geo = Geometry(cin, out_channels, kernel, stride, padding, dilation, groups, bias, mode)
                if mode != "zeros" and geo.side_padding() >= min(sizes):
                    continue
            if all(2 <= geo.out_size(s) <= 12 for s in sizes) and (
                not same or all(geo.out_size(s) == s for s in sizes)
            ):
                return geo
        return Geometry(cin, cout or cin, 1)

    def _channels(self, cin: int, cout: int | None) -> tuple[int, int]:
        rng = self.rng
        if cout is None:
            if cin <= 8 and rng.random() < 0.2:  # depthwise
                cout = rng.choice([c for c in (cin, 2 * cin) if c <= 8])
                return cout, cin
            cout = rng.randint(2, 8)
        common = [g for g in range(1, min(cin, cout) + 1) if cin % g == 0 and cout % g == 0]
        r = rng.random()
        if r < 0.6 or len(common) == 1:
            return cout, 1
        return cout, common[-1] if r < 0.8 else rng.choice(common[1:])

    def note_geometry(self, geo: Geometry, dims: int) -> None:
        kind = "ConvTranspose" if geo.transposed else "Conv"
        self.feature(f"{kind}{dims}d")
        for flag, name in (
            (geo.padding == 1, "padding=1"),
            (geo.padding == "same", "padding=same"),
            (geo.padding == "valid", "padding=valid"),
            (geo.padding_mode != "zeros", f"padding_mode={geo.padding_mode}"),
            (geo.stride == 2, "stride=2"),
            (geo.dilation == 2, "dilation=2"),
            (geo.groups > 1, "groups"),
            (geo.groups == geo.cin > 1, "depthwise"),
            (not geo.bias, "bias=False"),
            (geo.output_padding > 0, "output_padding"),
        ):
            if flag:
                self.feature(name)

    def conv(
        self, x: str, shape: Shape, cout: int | None = None, *, same: bool = False, kind: str | None = None
    ) -> tuple[str, Shape, Layer]:
        """A convolution of a random kind; returns its output, the output's shape and what the layer is."""
        dims = shape.dims
        if kind is None:
            kinds = {"module": 0.5, "functional": 0.12, "std": 0.07, "parametrize": 0.07, "weight_norm": 0.07}
            if dims <= 2 and not same and shape.layout == "conv":
                kinds["transposed"] = 0.12
            if shape.layout == "unbatched":
                kinds.pop("functional")
            kind = self.weighted(kinds)
        geo = self.geometry(shape, cout, same=same, transposed=kind == "transposed")
        if kind == "functional":
            geo = replace(geo, padding_mode="zeros")
        if kind == "std" and geo.kernel == 1 and geo.cin == geo.groups:
            kind = "module"  # standardising a single weight per filter divides by a zero variance
        self.note_geometry(geo, dims)
        out_shape = replace(shape, channels=geo.cout, spatial=tuple(geo.out_size(s) for s in shape.spatial))
        if kind == "functional":
            self.feature("F.conv")
            prefix = self.name("fconv")
            weight = self.member_as(f"{prefix}_weight", call(parameter, *geo.weight_shape(dims), init="fan_in"))
            bias = self.member_as(f"{prefix}_bias", call(parameter, geo.cout, init="small")) if geo.bias else None
            y = self.step(
                "conv_f",
                x,
                dims=dims,
                weight=weight,
                bias=bias,
                stride=geo.stride,
                padding=geo.padding,
                dilation=geo.dilation,
                groups=geo.groups,
            )
            return y, out_shape, Layer(None, kind)
        if kind == "transposed":
            built = geo.module_call(_TRANSPOSED[dims])
        elif kind == "std":
            self.feature("StdConv")
            built = geo.module_call(_STD_CONVS[dims])
        else:
            built = geo.module_call(_CONVS[dims])
        if kind == "parametrize":
            self.feature("parametrize")
            built = call(parametrize.register_parametrization, built, "weight", call(UnitNorm))
        elif kind == "weight_norm":
            self.feature("weight_norm")
            built = call(weight_norm, built)
        name = self.member("conv", built)
        return self.step("call", x, module=name), out_shape, Layer(name, kind)

    def linear(self, x: str, fin: int, fout: int | None = None) -> tuple[str, int]:
        fout = fout or self.rng.randint(2, 8)
        bias = self.rng.random() < 0.7
        if self.rng.random() < 0.2:
            self.feature("F.linear")
            prefix = self.name("flin")
            weight = self.member_as(f"{prefix}_weight", call(parameter, fout, fin, init="fan_in"))
            b = self.member_as(f"{prefix}_bias", call(parameter, fout, init="small")) if bias else None
            return self.step("linear_f", x, weight=weight, bias=b), fout
        name = self.member("fc", call(nn.Linear, fin, fout, init="layer", **({} if bias else {"bias": False})))
        return self.step("call", x, module=name), fout

    def norm_call(
        self, rank: int, features: int, per_channel: int, *, module_only: bool = False, affine: bool = False
    ) -> tuple[Call | None, float]:
        """A BatchNorm constructor of a random form and its eps; ``None`` stands for ``F.batch_norm`` on buffers."""
        options = {}
        for form, (weight, ranks) in _NORM_FORMS.items():
            if rank not in ranks or (form in _BATCH_STATS_FORMS and per_channel <= 1):
                continue
            if (module_only and form == "F.batch_norm") or (affine and form not in _AFFINE_MODULE_FORMS):
                continue
            options[form] = weight
        form = self.weighted(options)
        eps = self.rng.choice((1e-5, 1e-5, 1e-3, 0.1))
        eps_kw = {} if eps == 1e-5 else {"eps": eps}
        cls = _BATCH_NORMS[rank]
        self.feature(cls.__name__)
        if form == "F.batch_norm":
            self.feature("F.batch_norm")
            return None, eps
        if form == "bn":
            return call(cls, features, init="norm", **eps_kw), eps
        if form == "affine=False":
            self.feature("bn affine=False")
            return call(cls, features, init="norm", affine=False, **eps_kw), eps
        if form == "track_running_stats=False":
            self.feature("bn track_running_stats=False")
            return call(cls, features, init="norm", track_running_stats=False, **eps_kw), eps
        if form == "running-stats flag off":
            self.feature("bn running-stats flag off")
            return call(running_stats_off, call(cls, features, init="norm", **eps_kw)), eps
        if form == "SyncBatchNorm":
            self.feature("SyncBatchNorm")
            return call(nn.SyncBatchNorm, features, init="norm", **eps_kw), eps
        if form == "subclass":
            self.feature("BatchNorm subclass")
            return call(PlainBatchNorm2d, features, init="norm", **eps_kw), eps
        if form == "FrozenBatchNorm2d":
            self.feature("FrozenBatchNorm2d")
            return call(FrozenBatchNorm2d, features, init="norm", **eps_kw), eps
        self.feature("BatchNormAct2d")
        return call(BatchNormAct2d, features, init="norm", act=self.rng.random() < 0.5, **eps_kw), eps

    def norm(
        self, x: str, size: tuple[int, ...], features: int | None = None
    ) -> tuple[str, Callable[[str], str], str | None]:
        """A BatchNorm of a random form over a value of ``size`` (its channels at dim 1).

        Returns:
            The output, a function that applies the same BatchNorm to another value, and the member name of the
            BatchNorm module (``None`` for ``F.batch_norm``).
        """
        features = features or size[1]
        built, eps = self.norm_call(len(size), features, math.prod(size) // features)
        if built is None:
            prefix = self.name("fbn")
            affine = self.rng.random() < 0.8
            self.member_as(f"{prefix}_mean", call(buffer, features, init="small"))
            self.member_as(f"{prefix}_var", call(buffer, features, init="unit"))
            if affine:
                self.member_as(f"{prefix}_weight", call(parameter, features, init="unit"))
                self.member_as(f"{prefix}_bias", call(parameter, features, init="small"))

            def apply_functional(a: str) -> str:
                return self.step("bn_f", a, prefix=prefix, affine=affine, eps=eps)

            return apply_functional(x), apply_functional, None
        name = self.member("bn", built)

        def apply_module(a: str) -> str:
            return self.step("call", a, module=name)

        return apply_module(x), apply_module, name

    def activation(self, x: str, *, fresh: bool) -> str:
        """Maybe an activation; in-place forms only on a ``fresh`` value that nothing else reads."""
        options = {
            "none": 0.45,
            "F.relu": 0.15,
            "F.silu": 0.06,
            "F.gelu": 0.04,
            "F.hardswish": 0.04,
            "torch.tanh": 0.04,
            "ReLU": 0.06,
        }
        if fresh:
            options |= {"ReLU(inplace=True)": 0.08, "relu_": 0.08}
        kind = self.weighted(options)
        if kind == "none":
            return x
        if kind == "relu_":
            self.feature("relu_")
            return self.step("relu_", x, out=x)
        if kind in ("ReLU", "ReLU(inplace=True)"):
            if kind != "ReLU":
                self.feature("ReLU(inplace=True)")
            name = self.member("act", call(nn.ReLU, **({"inplace": True} if kind != "ReLU" else {})))
            return self.step("call", x, module=name)
        return self.step("act", x, fn=kind)

    def between(self, y: str, shape: Shape) -> str:
        """Maybe an op between a fresh layer output and the BatchNorm after it."""
        kind = self.weighted(
            {
                "none": 0.65,
                "gamma": 0.06,
                "mul": 0.04,
                "div": 0.03,
                "shift": 0.03,
                "mul_out": 0.05,
                "mul_": 0.04,
                "relu_": 0.04,
                "dropout": 0.04,
                "act": 0.02,
            }
        )
        if kind == "none":
            return y
        if kind == "gamma":
            return self.gamma(y, shape)
        if kind in ("mul", "div", "shift"):
            self.feature("constant scale")
            return self.step(kind, y, c=self.rng.choice((2, 0.5, -1.5, 1)))
        if kind == "mul_out":
            self.feature("torch.mul(out=)")
            return self.step("mul_out", y, c=self.rng.choice((2, 0.5)))
        if kind == "mul_":
            self.feature("mul_")
            return self.step("mul_", y, out=y, c=self.rng.choice((2, -0.5)))
        if kind == "relu_":
            self.feature("relu_")
            return self.step("relu_", y, out=y)
        if kind == "dropout":
            return self.dropout(y)
        return self.step("act", y, fn="F.relu")

    def gamma(self, y: str, shape: Shape) -> str:
        self.feature("gamma scale")
        param = self.member("gamma", call(parameter, shape.channels, init="unit"))
        return self.step("scale", y, param=param, view=shape.channel_view)

    def dropout(self, y: str) -> str:
        self.feature("dropout")
        if self.rng.random() < 0.5:
            return self.step("dropout", y, p=0.5)
        return self.step("call", y, module=self.member("drop", call(nn.Dropout, 0.5)))

    def hooks(self, layer: str | None, bn: str | None) -> None:
        """Maybe a forward hook or pre-hook on the layer, or a forward hook on its BatchNorm."""
        r = self.rng.random()
        if r < 0.06 and layer is not None:
            self.feature("forward hook")
            self.wrap(layer, with_forward_hook, double_output)
        elif r < 0.1 and layer is not None:
            self.feature("forward pre-hook")
            self.wrap(layer, with_forward_pre_hook, halve_input)
        elif r < 0.13 and bn is not None:
            self.feature("forward hook")
            self.wrap(bn, with_forward_hook, double_output)

    # -- blocks

    def block(self, x: str, shape: Shape) -> tuple[str, Shape]:
        layout = shape.layout
        if layout == "conv":
            options = {
                "conv_bn": 4.0,
                "reshape_bn": 0.5,
                "bn_conv": 0.6,
                "residual": 0.8,
                "branches": 0.8,
                "cat": 0.6,
                "shared_conv": 0.5,
                "shared_bn": 0.5,
                "tied": 0.5,
                "conv_scale": 0.4,
                "untraceable": 0.6,
                "reach_into": 0.5,
                "misc": 0.6,
                "to_flat": 0.3,
            }
            if self.depth == 0:
                options["nested"] = 0.4
            if shape.dims == 1:
                options["to_seq"] = 0.3
        elif layout == "unbatched":
            options = {"unbatched_conv_bn": 3.0, "unbatched_conv": 0.5, "unsqueeze": 1.0}
        elif layout == "flat":
            options = {"linear_bn": 3.0, "bn_linear": 1.0, "flat_act": 0.5}
        else:
            options = {"linear_seq": 3.0, "seq_to_flat": 0.5}
        return getattr(self, f"_block_{self.weighted(options)}")(x, shape)

    def _block_conv_bn(self, x: str, shape: Shape) -> tuple[str, Shape]:
        y, out_shape, layer = self.conv(x, shape)
        y = self.between(y, out_shape)
        z, _, bn = self.norm(y, out_shape.size)
        self.hooks(layer.name, bn)
        r = self.rng.random()
        if r < 0.06 and layer.name is not None and layer.kind != "transposed":
            self.feature("reads layer weight")
            z = self.step("read_weight", z, x, module=layer.name, dims=shape.dims)
        elif r < 0.1 and layer.name is not None:
            self.feature("weight.abs().sum()")
            z = self.step("weight_abs", z, module=layer.name)
        if self.rng.random() < 0.1:
            z = self.gamma(z, out_shape)
        return self.activation(z, fresh=True), out_shape

    def _block_reshape_bn(self, x: str, shape: Shape) -> tuple[str, Shape]:
        y, s, _ = self.conv(x, shape, kind="module")
        self.feature("reshape before bn")
        c, sp = s.channels, s.spatial
        options = (
            ["flatten(2)", "view"]
            + (["merge channels"] if s.dims >= 2 else [])
            + (["flatten(1)"] if c * math.prod(sp) <= 96 else [])
        )
        kind = self.rng.choice(options)
        if kind == "flatten(2)":
            y = self.step("flatten", y, start=2, end=-1)
            size = (s.batch, c, math.prod(sp))
        elif kind == "view":
            y = self.step("reshape", y, shape=(-1, c, *sp))
            size = s.size
        elif kind == "merge channels":
            y = self.step("reshape", y, shape=(-1, c * sp[0], *sp[1:]))
            size = (s.batch, c * sp[0], *sp[1:])
        else:
            y = self.step("flatten", y, start=1, end=-1)
            size = (s.batch, c * math.prod(sp))
        z, _, _ = self.norm(y, size)
        z = self.step("reshape", z, shape=(-1, c, *sp))
        return self.activation(z, fresh=False), s

    def _block_bn_conv(self, x: str, shape: Shape) -> tuple[str, Shape]:
        self.feature("bn before layer")
        y, _, _ = self.norm(x, shape.size)
        y = self.activation(y, fresh=True) if self.rng.random() < 0.3 else y
        z, s, _ = self.conv(y, shape)
        return z, s

    def _block_residual(self, x: str, shape: Shape) -> tuple[str, Shape]:
        self.feature("residual")
        y, s, layer = self.conv(x, shape, shape.channels, same=True)
        y = self.between(y, s)
        y, _, _ = self.norm(y, s.size)
        kind = self.rng.choice(("add", "iadd", "act_add"))
        if kind == "iadd":
            self.feature("residual +=")
            z = self.step("iadd", y, x, out=y)
        elif kind == "act_add":
            z = self.step("sum", self.activation(y, fresh=True), x)
        else:
            z = self.step("sum", y, x)
        return self.activation(z, fresh=True), s

    def _block_branches(self, x: str, shape: Shape) -> tuple[str, Shape]:
        """RepVGG/MobileOne: parallel conv+BN branches and an identity BN, summed."""
        self.feature("branches")
        rng, cin = self.rng, shape.channels
        identity = rng.random() < 0.6
        stride = 1 if identity or rng.random() < 0.7 else 2
        cout, groups = self._channels(cin, cin if identity else None)
        dims = shape.dims
        out_shape = replace(shape, channels=cout, spatial=tuple((s - 1) // stride + 1 for s in shape.spatial))
        terms = []
        for kernel in (3, 1) if rng.random() < 0.8 else (3,):
            geo = Geometry(cin, cout, kernel, stride, kernel // 2, 1, groups, rng.random() < 0.3)
            self.note_geometry(geo, dims)
            conv = self.member("conv", geo.module_call(_CONVS[dims]))
            y, _, _ = self.norm(self.step("call", x, module=conv), out_shape.size)
            terms.append(y)
        if identity:
            y, _, _ = self.norm(x, shape.size)
            terms.append(y)
        if cout == cin and min(shape.spatial) >= 3 and not (dims == 3 and self.bfloat16) and rng.random() < 0.2:
            self.feature("avg_pool")
            pool = self.member("pool", call(_AVG_POOLS[dims], 3, stride, 1))
            y, _, _ = self.norm(self.step("call", x, module=pool), out_shape.size)
            terms.append(y)
        z = self.step("sum", *terms) if len(terms) > 1 else terms[0]
        return self.activation(z, fresh=True), out_shape

    def _block_cat(self, x: str, shape: Shape) -> tuple[str, Shape]:
        self.feature("cat")
        rng, dims = self.rng, shape.dims
        stride = 1 if rng.random() < 0.7 else 2
        out_spatial = tuple((s - 1) // stride + 1 for s in shape.spatial)
        parts, channels = [], 0
        for _ in range(rng.randint(2, 3)):
            r = rng.random()
            if r < 0.1 and stride == 1:
                parts.append(x)
                channels += shape.channels
                continue
            cout = rng.randint(2, 4)
            kernel = rng.choice((1, 3, 5))
            geo = Geometry(shape.channels, cout, kernel, stride, kernel // 2, bias=rng.random() < 0.3)
            self.note_geometry(geo, dims)
            y = self.step("call", x, module=self.member("conv", geo.module_call(_CONVS[dims])))
            parts.append(self.step("act", y, fn="F.relu") if r < 0.2 else y)
            channels += cout
        out_shape = replace(shape, channels=channels, spatial=out_spatial)
        y, _, _ = self.norm(self.step("cat", *parts), out_shape.size)
        return self.activation(y, fresh=True), out_shape

    def _block_shared_conv(self, x: str, shape: Shape) -> tuple[str, Shape]:
        """One conv module called twice."""
        self.feature("shared conv")
        if self.rng.random() < 0.5:
            y, s, layer = self.conv(x, shape, shape.channels, same=True, kind="module")
            y, _, _ = self.norm(y, s.size)
            y = self.activation(y, fresh=True)
            y2 = self.step("call", y, module=layer.name)
            z, _, _ = self.norm(y2, s.size)
            return z, s
        y, s, layer = self.conv(x, shape, kind="module")
        a, _, _ = self.norm(y, s.size)
        b, _, _ = self.norm(self.step("call", x, module=layer.name), s.size)
        return self.step("sum", a, b), s

    def _block_shared_bn(self, x: str, shape: Shape) -> tuple[str, Shape]:
        """One BatchNorm (module or functional buffers) applied after two convs."""
        self.feature("shared bn")
        y, s, _ = self.conv(x, shape, shape.channels, same=True)
        a, bn, _ = self.norm(y, s.size)
        if self.rng.random() < 0.5:
            y2, _, _ = self.conv(self.activation(a, fresh=True), s, s.channels, same=True)
            return bn(y2), s
        y2, _, _ = self.conv(x, shape, shape.channels, same=True)
        return self.step("sum", a, bn(y2)), s

    def _block_tied(self, x: str, shape: Shape) -> tuple[str, Shape]:
        """Two convs sharing one weight Parameter."""
        self.feature("tied weights")
        chain = self.rng.random() < 0.5
        geo = self.geometry(shape, shape.channels, same=True) if chain else self.geometry(shape)
        self.note_geometry(geo, shape.dims)
        first = self.member("conv", geo.module_call(_CONVS[shape.dims]))
        second = self.member("conv", replace(geo, bias=self.rng.random() < 0.5).module_call(_CONVS[shape.dims]))
        self.spec.ties.append((second, first))
        s = replace(shape, channels=geo.cout, spatial=tuple(geo.out_size(v) for v in shape.spatial))
        a, _, _ = self.norm(self.step("call", x, module=first), s.size)
        if chain:
            b, _, _ = self.norm(self.step("call", a, module=second), s.size)
            return b, s
        b, _, _ = self.norm(self.step("call", x, module=second), s.size)
        return self.step("sum", a, b), s

    def _block_conv_scale(self, x: str, shape: Shape) -> tuple[str, Shape]:
        y, s, _ = self.conv(x, shape)
        if self.rng.random() < 0.5:
            y = self.gamma(y, s)
        else:
            self.feature("constant scale")
            y = self.step(self.rng.choice(("mul", "div", "shift")), y, c=self.rng.choice((2, 0.5, 1)))
        return self.activation(y, fresh=True), s

    def _block_untraceable(self, x: str, shape: Shape) -> tuple[str, Shape]:
        self.feature("untraceable child")
        c = shape.channels

        def conv_norm(affine: bool = False) -> Call:
            geo = self.geometry(shape, c, same=True)
            self.note_geometry(geo, shape.dims)
            bn, _ = self.norm_call(len(shape.size), c, math.prod(shape.size) // c, module_only=True, affine=affine)
            return call(ConvNorm, geo.module_call(_CONVS[shape.dims]), bn)

        read_bn = self.rng.random() < 0.5
        if read_bn:
            self.feature("reads bn weight")
        seq = call(nn.Sequential, *(conv_norm() for _ in range(self.rng.randint(1, 2))))
        block = call(DataDependentBlock, seq, conv_norm(affine=read_bn), **({"read_bn": True} if read_bn else {}))
        return self.step("call", x, module=self.member("gate", block)), shape

    def _block_reach_into(self, x: str, shape: Shape) -> tuple[str, Shape]:
        """A child called whole, and by the same forward indexed, iterated or called in parts: ``self.seq0(x)`` and
        ``self.seq0[0](x)``. Folding the child's BatchNorm into its layer then needs generated code, and the
        forward that reaches into the child must be inside what that code replaces."""
        c = shape.channels
        geo = self.geometry(shape, c, same=True)
        self.note_geometry(geo, shape.dims)
        bn, _ = self.norm_call(len(shape.size), c, math.prod(shape.size) // c, module_only=True)
        layer = geo.module_call(_CONVS[shape.dims])
        kind = self.rng.choice(("index", "iterate", "part"))
        if kind == "part":
            self.feature("calls a child's part")
            child, part = self.member("cn", call(ConvNorm, layer, bn)), "conv"
        else:
            act = [call(nn.ReLU)] if self.rng.random() < 0.5 else []
            child, part = self.member("seq", call(nn.Sequential, layer, bn, *act)), "0"
        y = self.step("call", x, module=child)
        if kind == "iterate":
            self.feature("iterates a child")
            z = self.step("iterate", x, module=child)
        else:
            if kind == "index":
                self.feature("indexes a child")
            z = self.step("part", x, module=child, part=part)
            if self.rng.random() < 0.5:
                z, _, _ = self.norm(z, shape.size)
        return self.step("sum", y, z), shape

    def _block_nested(self, x: str, shape: Shape) -> tuple[str, Shape]:
        self.feature("nested net")
        name = self.name("stage")
        spec = NetSpec(name.capitalize())
        sub = _Drawer(self.rng, spec, self.features, depth=self.depth + 1, bfloat16=self.bfloat16)
        y, s = "x", shape
        for _ in range(self.rng.randint(1, 2)):
            y, s = sub.block(y, s)
        spec.output = y
        return self.step("call", x, module=self.member_as(name, spec)), s

    def _block_misc(self, x: str, shape: Shape) -> tuple[str, Shape]:
        kind = self.rng.choice(("pool", "act", "dropout", "identity"))
        if kind == "pool" and min(shape.spatial) >= 4 and not (shape.dims == 3 and self.bfloat16):
            self.feature("avg_pool")
            s = replace(shape, spatial=tuple(v // 2 for v in shape.spatial))
            if self.rng.random() < 0.5:
                return self.step("pool", x, dims=shape.dims, k=2), s
            return self.step("call", x, module=self.member("pool", call(_AVG_POOLS[shape.dims], 2))), s
        if kind == "dropout":
            return self.dropout(x), shape
        if kind == "identity":
            return self.step("call", x, module=self.member("identity", call(nn.Identity))), shape
        return self.activation(x, fresh=False), shape

    def _block_to_flat(self, x: str, shape: Shape) -> tuple[str, Shape]:
        if shape.channels * math.prod(shape.spatial) <= 96 and self.rng.random() < 0.4:
            y = self.step("flatten", x, start=1, end=-1)
            features = shape.channels * math.prod(shape.spatial)
        else:
            y = self.step("mean", x, dims=tuple(range(2, 2 + shape.dims)))
            features = shape.channels
        return self._block_linear_bn(y, Shape("flat", shape.batch, features))

    def _block_to_seq(self, x: str, shape: Shape) -> tuple[str, Shape]:
        y = self.step("transpose", x, dims=(1, 2))
        return self._block_linear_seq(y, Shape("seq", shape.batch, shape.channels, shape.spatial))

    def _block_linear_bn(self, x: str, shape: Shape) -> tuple[str, Shape]:
        self.feature("Linear 2-D")
        y, fout = self.linear(x, shape.channels)
        s = replace(shape, channels=fout)
        r = self.rng.random()
        if r < 0.1:
            y = self.gamma(y, s)
        elif r < 0.15:
            self.feature("torch.mul(out=)")
            y = self.step("mul_out", y, c=2)
        z, _, _ = self.norm(y, s.size)
        return self.activation(z, fresh=True), s

    def _block_bn_linear(self, x: str, shape: Shape) -> tuple[str, Shape]:
        self.feature("bn before layer")
        self.feature("Linear 2-D")
        y, _, _ = self.norm(x, shape.size)
        z, fout = self.linear(y, shape.channels)
        return self.activation(z, fresh=True), replace(shape, channels=fout)

    def _block_flat_act(self, x: str, shape: Shape) -> tuple[str, Shape]:
        return (self.dropout(x) if self.rng.random() < 0.4 else self.activation(x, fresh=False)), shape

    def _block_linear_seq(self, x: str, shape: Shape) -> tuple[str, Shape]:
        y, fout = self.linear(x, shape.channels)
        (length,) = shape.spatial
        s = replace(shape, channels=fout)
        if self.rng.random() < 0.6:
            # timm LeViT's LinearNorm: BatchNorm1d over the (N * L, F) rows, i.e. per output feature.
            self.feature("Linear 3-D + BatchNorm1d(flatten(0, 1))")
            flat = self.step("flatten", y, start=0, end=1)
            z, _, _ = self.norm(flat, (s.batch * length, fout))
            z = self.step("reshape", z, shape=(-1, length, fout))
        else:
            # BatchNorm1d on (N, L, F) normalises dim 1, i.e. per position: no per-feature fold exists.
            self.feature("Linear 3-D + BatchNorm1d(L)")
            z, _, _ = self.norm(y, s.size)
        return self.activation(z, fresh=False), s

    def _block_seq_to_flat(self, x: str, shape: Shape) -> tuple[str, Shape]:
        return self.step("mean", x, dims=1), Shape("flat", shape.batch, shape.channels)

    def _block_unbatched_conv_bn(self, x: str, shape: Shape) -> tuple[str, Shape]:
        """A conv on unbatched input, then a BatchNorm whose "channels" are the conv's first spatial dim."""
        self.feature("unbatched conv")
        y, s, _ = self.conv(x, shape, kind=self.rng.choice(("module", "module", "std", "weight_norm")))
        z, _, _ = self.norm(y, s.size)
        return self.activation(z, fresh=True), s

    def _block_unbatched_conv(self, x: str, shape: Shape) -> tuple[str, Shape]:
        self.feature("unbatched conv")
        y, s, _ = self.conv(x, shape, kind="module")
        return self.activation(y, fresh=True), s

    def _block_unsqueeze(self, x: str, shape: Shape) -> tuple[str, Shape]:
        return self.step("unsqueeze", x), Shape("conv", 1, shape.channels, shape.spatial)


# ------------------------------------------------------------------------------------------ programs


@dataclass
class Program:
    """One generated program: the model, its inputs, how to fuse it, and the source that describes it."""

    seed: int
    model: nn.Module
    inputs: tuple[Tensor, ...]
    source: str
    factory: Callable[[], nn.Module]
    num_ops: int
    dtype: torch.dtype
    example_inputs: bool
    fuse_twice: bool
    trace_first: bool
    features: frozenset[str]


def generate(seed: int, max_ops: int | None = None) -> Program:
    """Draw program ``seed``; with ``max_ops``, keep only its first ``max_ops`` blocks (same values, same options).

    Example:
        >>> program = generate(3)
        >>> out = program.model.eval()(*program.inputs)
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    features: set[str] = set()

    layout = rng.choices(("conv", "unbatched", "flat", "seq"), weights=(0.78, 0.08, 0.07, 0.07))[0]
    dims = rng.choices((1, 2, 3), weights=(0.3, 0.5, 0.2))[0]
    channels = rng.randint(2, 8)
    spatial = tuple(rng.randint(4, 6 if dims == 3 else 9) for _ in range(dims))
    batch = rng.randint(2, 3)
    if layout == "flat":
        shape = Shape("flat", batch, channels)
    elif layout == "seq":
        shape = Shape("seq", batch, channels, (rng.randint(2, 6),))
    else:
        shape = Shape(layout, 0 if layout == "unbatched" else batch, channels, spatial)

    dtype = rng.choices((torch.float32, torch.float64, torch.bfloat16), weights=(0.8, 0.1, 0.1))[0]
    memory_format = None
    if layout == "conv" and dims >= 2 and rng.random() < 0.25:
        memory_format = torch.channels_last if dims == 2 else torch.channels_last_3d
    train = rng.random() < 0.3
    root_hook = rng.choice((("forward", double_output), ("forward_pre", halve_input))) if rng.random() < 0.1 else None
    example_inputs = rng.random() < 0.5
    fuse_twice = rng.random() < 0.1
    want_trace = rng.random() < 0.15

    spec = NetSpec("FuzzNet", hooks=[root_hook] if root_hook else [])
    drawer = _Drawer(rng, spec, features, bfloat16=dtype == torch.bfloat16)
    num_ops = rng.randint(2, 5)
    if max_ops is not None:
        num_ops = min(num_ops, max_ops)
    x, s = "x", shape
    for _ in range(num_ops):
        x, s = drawer.block(x, s)
    spec.output = x

    # The inputs come first from the generator, so a program cut to fewer blocks keeps them and every value.
    inputs = (_finish(torch.randn(shape.size, generator=gen), dtype, memory_format),)

    def factory() -> nn.Module:
        return _finish(_construct(spec, None), dtype, memory_format).train(train)

    model = _finish(_construct(spec, gen), dtype, memory_format).train(train)
    # symbolic_trace bakes `self.training` in and drops the root's hooks: trace only where that changes nothing.
    trace_first = want_trace and root_hook is None and not train and _symbolic_traces(model)
    for flag, name in (
        (dtype == torch.float64, "float64"),
        (dtype == torch.bfloat16, "bfloat16"),
        (memory_format is not None, "channels_last"),
        (train, "train mode"),
        (root_hook is not None and root_hook[0] == "forward", "root hook"),
        (root_hook is not None and root_hook[0] == "forward_pre", "root pre-hook"),
        (example_inputs, "example_inputs"),
        (fuse_twice, "fuse twice"),
        (trace_first, "trace first"),
    ):
        if flag:
            drawer.feature(name)

    options = [
        {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16"}[dtype],
        *(["channels_last"] if memory_format is not None else []),
        "model in train mode" if train else "model in eval mode",
        "fuse(model, example_inputs=inputs)" if example_inputs else "fuse(model)",
        *(["fused again: fuse(fuse(model))"] if fuse_twice else []),
        *(["fuse(torch.fx.symbolic_trace(model))"] if trace_first else []),
    ]
    header = [
        f"# fuzz program {seed}" + (f" cut to its first {max_ops} block(s)" if max_ops is not None else ""),
        f"# {', '.join(options)}",
        f"# x = torch.randn{shape.size}  # the input",
        "# values from torch.Generator().manual_seed(seed), input first, then members in order:",
        "#   conv/linear weights ~ N(0, 1/fan_in), biases ~ 0.1 * N(0, 1);",
        "#   BatchNorm running_mean and bias ~ 0.1 * N(0, 1), running_var and weight ~ U(0.5, 1.5)",
    ]
    source = "\n".join(header) + "\n\n" + _net_source(spec)
    return Program(
        seed=seed,
        model=model,
        inputs=inputs,
        source=source,
        factory=factory,
        num_ops=num_ops,
        dtype=dtype,
        example_inputs=example_inputs,
        fuse_twice=fuse_twice,
        trace_first=trace_first,
        features=frozenset(features),
    )


def _symbolic_traces(model: nn.Module) -> bool:
    try:
        # On a copy: tracing stores the tensors it computes eagerly as `_tensor_constant<i>` attributes of the root.
        torch.fx.symbolic_trace(copy.deepcopy(model))
    except Exception:  # data-dependent control flow, or a BatchNorm subclass checking its input's rank
        return False
    return True


def _construct(spec: NetSpec, gen: torch.Generator | None) -> FuzzNet:
    # Module constructors draw their default initialisation from the global generator: keep it untouched.
    with torch.random.fork_rng(devices=[]):
        return FuzzNet(spec, gen)


def _finish(value: Any, dtype: torch.dtype, memory_format: torch.memory_format | None) -> Any:
    value = value.to(dtype)
    if memory_format is not None:
        value = value.to(memory_format=memory_format)
    return value


def _net_source(spec: NetSpec) -> str:
    base = "nn.Module" if spec.name == "FuzzNet" else "FuzzNet"
    lines = [f"class {spec.name}({base}):", "    def __init__(self):"]
    nested = []
    for name, value in spec.members:
        if isinstance(value, NetSpec):
            nested.append(value)
            lines.append(f"        self.{name} = {value.name}()")
            continue
        text = value.render(8)
        comment = f"  # ~ {_DISTRIBUTIONS[value.init]}" if value.init in _DISTRIBUTIONS else ""
        if value.fn is buffer:
            lines.append(f"        self.register_buffer({name!r}, {text}){comment}")
        else:
            lines.append(f"        self.{name} = {text}{comment}")
    lines += [f"        self.{dst}.weight = self.{src}.weight" for dst, src in spec.ties]
    lines += [f"        self.register_{kind}_hook({hook.__name__})" for kind, hook in spec.hooks]
    lines += ["", "    def forward(self, x):"]
    lines += [f"        {step}" for step in spec.steps]
    lines.append(f"        return {spec.output}")
    return "\n\n".join(["\n".join(lines), *(_net_source(n) for n in nested)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print a fuzz program's source.")
    parser.add_argument("seed", type=int)
    parser.add_argument("--max-ops", type=int, default=None, help="keep only the first blocks")
    args = parser.parse_args(argv)
    program = generate(args.seed, args.max_ops)
    print(program.source)
    print(f"\n# features: {', '.join(sorted(program.features))}")


if __name__ == "__main__":
    main()
