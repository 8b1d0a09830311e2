"""Check that a fused network still does its job: the same task metric and (nearly) the same outputs.

:class:`Verifier` is fed batches one at a time, so it works inside a Lightning loop as well as on its own;
every quantity it keeps is a torchmetrics metric, so :meth:`Verifier.compute` returns results synchronised
across processes whenever ``torch.distributed`` is initialised. :func:`verify` runs it over an iterable.
Nothing here imports Lightning.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map
from torchmetrics import MaxMetric, MeanMetric, MeanSquaredError, Metric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")
TARGET_KEYS = ("y", "target", "targets", "label", "labels")


def default_get_input(batch: Any) -> Any:
    """The network input of a batch: element 0 of a tuple/list, a known key of a dict, or a bare tensor.

    Args:
        batch: what the dataloader yields.

    Returns:
        The input to call the network with; a tuple returned here is unpacked as positional arguments. When the
        first element is itself a tuple or list (a list of images), it is returned wrapped as one argument; for a
        forward with several inputs, pass ``get_input=lambda batch: (batch[0], batch[1])``.

    Raises:
        TypeError: if the batch has none of these layouts.

    Example:
        >>> x = torch.zeros(2, 3)
        >>> default_get_input((x, torch.tensor([0, 1]))) is x, default_get_input({"image": x}) is x
        (True, True)
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        first = batch[0]
        # A sequence of inputs (the detection collate ``tuple(zip(*batch))`` yields a tuple of images) is one
        # argument, not several: wrapped, so that the tuple returned here unpacks into exactly it.
        return (first,) if isinstance(first, (tuple, list)) else first
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise TypeError(
            f"default_get_input(batch) found none of the input keys {list(INPUT_KEYS)} in a dict batch with keys "
            f"{list(batch)}. Pass get_input=lambda batch: batch['<your key>']."
        )
    raise TypeError(
        f"default_get_input(batch) cannot find the input in a batch of type {type(batch).__name__}; expected a "
        "tensor, a non-empty tuple/list (input first) or a dict. Pass get_input=lambda batch: ... that returns "
        "the network input."
    )


def default_get_target(batch: Any) -> Tensor | None:
    """The target of a batch: element 1 of a tuple/list, a known key of a dict, or ``None`` when there is none.

    Args:
        batch: what the dataloader yields.

    Returns:
        The target, or ``None`` for a bare tensor, a 1-element tuple or a dict without a target key.

    Raises:
        TypeError: if the batch is none of these layouts.

    Example:
        >>> y = torch.tensor([0, 1])
        >>> default_get_target((torch.zeros(2, 3), y)) is y, default_get_target(torch.zeros(2, 3))
        (True, None)
    """
    if isinstance(batch, Tensor):
        return None
    if isinstance(batch, (tuple, list)):
        return batch[1] if len(batch) > 1 else None
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                return batch[key]
        return None
    raise TypeError(
        f"default_get_target(batch) cannot find the target in a batch of type {type(batch).__name__}; expected a "
        "tensor, a tuple/list (target second) or a dict. Pass get_target=lambda batch: ... (or lambda batch: None "
        "to check only the outputs)."
    )


@dataclass
class VerificationResult:
    """The outcome of comparing an original network with its fused form.

    Attributes:
        metric_original: task metric values of the original network, by name (empty without targets).
        metric_fused: the same metrics for the fused network.
        max_abs_diff: the largest absolute difference between the two networks' outputs (float32).
        top1_agreement: the share of samples whose argmax over dim 1 agrees, for 2-D outputs; else ``None``.
        num_samples: samples compared.
        tolerance: the largest allowed ``|fused - original|`` per metric.
        passed: whether every metric stayed within ``tolerance`` (without targets: whether the outputs did,
            within ``output_tolerance`` when given, else ``tolerance``), and the outputs within
            ``output_tolerance`` when given.
        output_tolerance: the largest allowed ``max_abs_diff``, or ``None`` when outputs are only reported.
        notes: what was not checked, and why.
    """

    metric_original: dict[str, float]
    metric_fused: dict[str, float]
    max_abs_diff: float
    top1_agreement: float | None
    num_samples: int
    tolerance: float
    passed: bool
    output_tolerance: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def metric_diff(self) -> dict[str, float]:
        """``|fused - original|`` per metric name."""
        return {k: abs(self.metric_fused[k] - v) for k, v in self.metric_original.items() if k in self.metric_fused}

    def to_dict(self) -> dict[str, Any]:
        """Return the result as plain JSON-serialisable data."""
        return asdict(self)

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"verification {verdict} on {self.num_samples} samples (metric tolerance {self.tolerance:g})"]
        diffs = self.metric_diff
        width = max((len(k) for k in diffs), default=0)
        for name, diff in diffs.items():
            lines.append(
                f"  {name:<{width}}  original {self.metric_original[name]:.6f}  fused {self.metric_fused[name]:.6f}"
                f"  |diff| {diff:.2e}"
            )
        outputs = f"  outputs: max |diff| {self.max_abs_diff:.3e}"
        if self.output_tolerance is not None:
            outputs += f" (tolerance {self.output_tolerance:g})"
        if self.top1_agreement is not None:
            outputs += f", top-1 agreement {100 * self.top1_agreement:.2f}%"
        lines.append(outputs)
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


GetInput = Callable[[Any], Any]
GetTarget = Callable[[Any], "Tensor | None"]


class Verifier(nn.Module):
    """Accumulates the task metric of two networks and the closeness of their outputs, batch by batch.

    The metric given is updated with the original network's outputs and a clone of it with the fused
    network's; output closeness is kept in ``MaxMetric``/``MeanMetric``/``SumMetric``. All are torchmetrics
    metrics registered as sub-modules, so ``compute()`` synchronises them across processes and
    ``verifier.to(device)`` moves them (``update`` also moves them to the outputs' device by itself).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> verifier = Verifier(tolerance=1e-3)
        >>> verifier.update(net, net, (torch.randn(8, 4), torch.randint(0, 3, (8,))))
        >>> result = verifier.compute()
        >>> result.passed, result.num_samples, result.max_abs_diff
        (True, 8, 0.0)
    """

    def __init__(
        self,
        metric: Metric | MetricCollection | None = None,
        tolerance: float = 1e-3,
        get_input: GetInput = default_get_input,
        get_target: GetTarget = default_get_target,
        *,
        output_tolerance: float | None = None,
    ) -> None:
        """Configure the comparison.

        Args:
            metric: the task metric, e.g. ``MulticlassAccuracy(num_classes=10)`` or a ``MetricCollection``.
                It is reset and then updated with the original network's outputs (see :func:`scored_output`).
                ``None`` chooses one from the first batch with targets (see :func:`default_metric`); when none
                fits, only the outputs are compared, and the result says so.
            tolerance: the largest allowed ``|fused - original|`` of each metric value; negative never passes.
            get_input: maps a batch to the network input (a tuple is unpacked as positional arguments).
            get_target: maps a batch to the metric target, or ``None`` to skip the metric for that batch.
            output_tolerance: if given, ``max_abs_diff`` must also stay within it to pass.

        Raises:
            TypeError: if an argument has the wrong type.
            ValueError: if a tolerance is NaN.
        """
        super().__init__()
        self.tolerance = check_tolerance("Verifier", "tolerance", tolerance)
        self.output_tolerance = (
            None if output_tolerance is None else check_tolerance("Verifier", "output_tolerance", output_tolerance)
        )
        check_metric("Verifier", metric)
        check_callable("Verifier", "get_input", get_input)
        check_callable("Verifier", "get_target", get_target)
        self.get_input = get_input
        self.get_target = get_target
        self.metric_original: Metric | MetricCollection | None = None
        self.metric_fused: Metric | MetricCollection | None = None
        if metric is not None:
            metric.reset()
            self.metric_original = metric
            self.metric_fused = metric.clone()
        self.max_abs_diff = MaxMetric(nan_strategy="disable")
        self.top1_agreement = MeanMetric()
        self.num_samples = SumMetric()
        self.num_targeted = SumMetric()
        #: Why the task metric is not computed (no default metric fits the outputs and targets), or "".
        self.outputs_only = ""

    def forward(self, original: nn.Module, fused: nn.Module, batch: Any) -> None:
        """Same as :meth:`update`."""
        self.update(original, fused, batch)

    def update(self, original: Callable[..., Any], fused: Callable[..., Any], batch: Any) -> None:
        """Run both networks on the batch's input and accumulate metrics and output closeness.

        Both run in eval mode under ``torch.no_grad()``; their ``training`` flags are restored afterwards.
        Floating inputs are cast to each network's parameter dtype and moved to its device. Outputs of any form
        (tensor, tuple, dict, list of dicts) are compared leaf by leaf (:func:`compare_outputs`).

        Args:
            original: the network before fusion.
            fused: the fused network.
            batch: one batch as the dataloader yields it.

        Raises:
            TypeError: if the networks are not callable.
            ValueError: if the two networks' outputs differ in structure or shape.
        """
        for name, net in (("original", original), ("fused", fused)):
            if not callable(net):
                raise TypeError(
                    f"Verifier.update({name}=...) expects a network (nn.Module or callable), got "
                    f"{type(net).__name__}. Call update(original_net, fused_net, batch)."
                )
        inputs = self.get_input(batch)
        target = self.get_target(batch)
        with torch.no_grad():
            out_original = _run(original, inputs)
            out_fused = _run(fused, inputs)
        difference = compare_outputs(out_original, out_fused)
        preds_original, preds_fused = scored_output(out_original), scored_output(out_fused)
        device = _device_of(out_original)
        if self.metric_original is None and target is not None:
            self.default_metric_for(out_original, target)
        self.to(device)

        self.max_abs_diff.update(torch.tensor(difference, device=device))
        batch_size = _batch_size(preds_original, inputs)
        self.num_samples.update(torch.tensor(float(batch_size), device=device))
        if isinstance(preds_original, Tensor) and preds_original.dim() == 2 and preds_original.shape[0] > 0:
            agree = (preds_original.argmax(dim=1) == preds_fused.to(device).argmax(dim=1)).to(torch.float32)
            self.top1_agreement.update(agree)
        if target is not None and self.metric_original is not None and self.metric_fused is not None:
            target = tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, target)
            self.metric_original.update(_as_float(preds_original), target)
            self.metric_fused.update(_as_float(tree_map(_to(device), preds_fused)), target)
            self.num_targeted.update(torch.tensor(float(batch_size), device=device))

    def default_metric_for(self, outputs: Any, target: Any = None) -> None:
        """Choose the default metric (``metric=None``) from one batch of the original network's outputs and its
        targets, now (see :func:`default_metric`).

        ``update`` does it at the first batch with targets; a process that may see no batch (a distributed run
        with fewer batches than processes) calls this first, so every process holds the same metric to
        synchronise. When no default fits, verification compares the outputs only and says so. Does nothing
        when a metric is already set.
        """
        if self.metric_original is not None or self.outputs_only:
            return
        metric = default_metric(outputs, target)
        if metric is None:
            self.outputs_only = (
                f"no default metric fits outputs {_describe(scored_output(outputs))} with targets "
                f"{_describe(target)}: only the outputs were compared; pass metric=... for the task"
            )
            return
        metric = metric.to(_device_of(outputs))
        self.metric_original = metric
        self.metric_fused = metric.clone()

    def compute(self) -> VerificationResult:
        """Return the comparison over every batch seen (over every process when distributed).

        Raises:
            RuntimeError: if no batch was seen.
        """
        with warnings.catch_warnings():
            # An aggregation never updated (no 2-D outputs) warns on compute; that case is reported as None.
            warnings.filterwarnings("ignore", message=r".*compute.*before.*update.*")
            num_samples = int(round(float(self.num_samples.compute())))
            num_targeted = int(round(float(self.num_targeted.compute())))
            max_abs_diff = float(self.max_abs_diff.compute())
            top1 = float(self.top1_agreement.compute())
        if num_samples == 0:
            raise RuntimeError(
                "Verifier.compute() was called before any batch was seen. Feed batches with "
                "verifier.update(original, fused, batch) first."
            )
        notes: list[str] = []
        metric_original: dict[str, float] = {}
        metric_fused: dict[str, float] = {}
        limit = self.tolerance if self.output_tolerance is None else self.output_tolerance
        if self.outputs_only:
            notes.append(f"{self.outputs_only} (max |diff| <= {limit:g})")
        elif num_targeted == 0:
            notes.append(
                f"no targets in the batches: only the outputs were compared (max |diff| <= {limit:g}), "
                "not the task metric"
            )
        else:
            assert self.metric_original is not None  # built at the first batch
            assert self.metric_fused is not None
            metric_original = _to_floats(self.metric_original)
            metric_fused = _to_floats(self.metric_fused)
            if num_targeted < num_samples:
                notes.append(f"the task metric covers the {num_targeted} of {num_samples} samples that had targets")
        top1_agreement = None if math.isnan(top1) else top1
        if top1_agreement is None:
            notes.append("outputs are not 2-D logits: top-1 agreement not computed")

        if metric_original:
            passed = all(
                abs(metric_fused[k] - v) <= self.tolerance for k, v in metric_original.items() if k in metric_fused
            ) and set(metric_original) == set(metric_fused)
            if self.output_tolerance is not None:
                passed = passed and max_abs_diff <= self.output_tolerance
        else:
            passed = max_abs_diff <= limit
        return VerificationResult(
            metric_original=metric_original,
            metric_fused=metric_fused,
            max_abs_diff=max_abs_diff,
            top1_agreement=top1_agreement,
            num_samples=num_samples,
            tolerance=self.tolerance,
            passed=bool(passed),
            output_tolerance=self.output_tolerance,
            notes=notes,
        )

    def reset(self) -> None:
        """Forget every batch seen so far."""
        for metric in (self.metric_original, self.metric_fused, self.max_abs_diff, self.top1_agreement):
            if metric is not None:
                metric.reset()
        self.num_samples.reset()
        self.num_targeted.reset()


def verify(
    original: Callable[..., Any],
    fused: Callable[..., Any],
    batches: Iterable[Any],
    *,
    metric: Metric | MetricCollection | None = None,
    tolerance: float = 1e-3,
    max_batches: int | None = None,
    get_input: GetInput = default_get_input,
    get_target: GetTarget = default_get_target,
    output_tolerance: float | None = None,
) -> VerificationResult:
    """Compare ``original`` and ``fused`` over ``batches`` (a DataLoader or any iterable of batches).

    Args:
        original: the network before fusion.
        fused: the fused network, e.g. ``fx_lightning.fuse(original)``.
        batches: an iterable of batches, e.g. a validation DataLoader.
        metric: the task metric; ``None`` chooses one from the outputs and targets (:func:`default_metric`).
        tolerance: the largest allowed ``|fused - original|`` of each metric value.
        max_batches: stop after this many batches; ``None`` for all.
        get_input: maps a batch to the network input.
        get_target: maps a batch to the metric target (``None`` to compare outputs only).
        output_tolerance: if given, the largest allowed absolute difference between outputs.

    Returns:
        The :class:`VerificationResult`.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if ``max_batches`` is not positive or ``batches`` is empty.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).eval()
        >>> from fx_lightning import fuse
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
        >>> verify(net, fuse(net, (data[0][0],)), data).passed
        True
    """
    check_max_batches("verify", "max_batches", max_batches)
    if isinstance(batches, (Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"verify(batches=...) expects an iterable of batches such as a DataLoader, got {type(batches).__name__}. "
            "Wrap a single batch in a list: verify(original, fused, [batch])."
        )
    verifier = Verifier(metric, tolerance, get_input, get_target, output_tolerance=output_tolerance)
    seen = 0
    for batch in batches:
        verifier.update(original, fused, batch)
        seen += 1
        if max_batches is not None and seen >= max_batches:
            break
    if seen == 0:
        raise ValueError("verify(batches=...) got no batches. Pass a non-empty DataLoader or list of batches.")
    return verifier.compute()


def _run(net: Callable[..., Any], inputs: Any) -> Any:
    param = _first_floating_parameter(net)
    if param is not None:
        inputs = _match_inputs(inputs, param.dtype, param.device)
    with eval_mode(net):
        return call_with_input(net, inputs)


def call_with_input(fn: Callable[..., Any], inputs: Any) -> Any:
    """Call ``fn`` with what ``get_input`` returned: a tuple as positional arguments, a dict as keyword arguments
    when ``fn``'s signature takes those names, anything else (a dict too, otherwise) as the one argument.

    Example:
        >>> call_with_input(lambda a, b: a - b, (3, 1)), call_with_input(lambda a, b: a - b, {"b": 1, "a": 3})
        (2, 2)
    """
    if isinstance(inputs, tuple):
        return fn(*inputs)
    if isinstance(inputs, Mapping) and _takes_keywords(fn, inputs):
        return fn(**inputs)
    return fn(inputs)


def _takes_keywords(fn: Callable[..., Any], inputs: Mapping[Any, Any]) -> bool:
    if not inputs or not all(isinstance(k, str) for k in inputs):
        return False
    try:
        inspect.signature(fn).bind(**inputs)
    except (TypeError, ValueError):
        return False
    return True


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Leave the global random state as found: torch (CPU and every initialised CUDA device), NumPy and ``random``.

    Iterating a DataLoader draws a seed from torch's generator; verifying inside someone else's run must not
    change the random numbers that come after it.

    Example:
        >>> with preserved_rng():
        ...     _ = torch.rand(1), np.random.rand(), random.random()
        >>> state = torch.get_rng_state()
        >>> with preserved_rng():
        ...     _ = torch.rand(3)
        >>> torch.equal(state, torch.get_rng_state())
        True
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _first_floating_parameter(net: Any) -> Tensor | None:
    if not isinstance(net, nn.Module):
        return None
    for tensor in (*net.parameters(), *net.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def _match_inputs(inputs: Any, dtype: torch.dtype, device: torch.device) -> Any:
    def convert(value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        if value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
        return value.to(device)

    return tree_map(convert, inputs)


@contextlib.contextmanager
def eval_mode(net: Any) -> Iterator[None]:
    """Eval mode inside the block; afterwards every sub-module gets its own flag back (frozen BNs stay eval)."""
    if not isinstance(net, nn.Module):
        yield
        return
    flags = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def compare_outputs(original: Any, fused: Any) -> float:
    """The largest absolute difference between two outputs of any form (tensor, tuple, dict, list of dicts), leaf by
    leaf, in float64; a NaN difference counts as infinite, non-tensor leaves must be equal (else infinite).

    Raises:
        ValueError: if the two outputs differ in structure or in the shape of a tensor.

    Example:
        >>> compare_outputs({"boxes": torch.ones(2, 4), "n": 2}, {"boxes": torch.ones(2, 4) * 1.5, "n": 2})
        0.5
    """
    leaves, spec = tree_flatten(original)
    other_leaves, other_spec = tree_flatten(fused)
    kinds = [isinstance(x, Tensor) for x in leaves] != [isinstance(x, Tensor) for x in other_leaves]
    if spec != other_spec or kinds:
        raise ValueError(
            f"Verifier.update(): the original network returned {_describe(original)} but the fused one "
            f"{_describe(fused)}. They must compute the same function; check the fusion report."
        )
    worst = 0.0
    for a, b in zip(leaves, other_leaves):
        if not isinstance(a, Tensor) or not isinstance(b, Tensor):
            if a != b:
                worst = math.inf
            continue
        if a.shape != b.shape:
            raise ValueError(
                f"Verifier.update(): the original network returned shape {tuple(a.shape)} but the fused one "
                f"{tuple(b.shape)}. They must compute the same function; check the fusion report."
            )
        if a.numel() == 0:
            continue
        diff = (a.detach().to(torch.float64) - b.detach().to(a.device, torch.float64)).abs().max()
        worst = max(worst, math.inf if math.isnan(float(diff)) else float(diff))
    return worst


def scored_output(output: Any) -> Any:
    """What a metric scores: the output itself, the first element of a tuple (``(logits, aux)``), the
    ``logits``/``out``/``output`` entry of a dict; any other form (a list of detection dicts) as it is."""
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, Mapping):
        for key in ("logits", "out", "output"):
            if isinstance(output.get(key), Tensor):
                return output[key]
    return output


def default_metric(outputs: Any, target: Any) -> Metric | None:
    """The metric ``metric=None`` stands for, chosen from one batch of outputs and targets, or ``None``.

    * class logits ``(N, C)`` with integer targets ``(N,)``: ``MulticlassAccuracy(num_classes=C)``;
    * per-pixel logits ``(N, C, ...)`` with integer targets ``(N, ...)``: ``MulticlassJaccardIndex(num_classes=C)``;
    * floating outputs with floating targets of the same shape: ``MeanSquaredError()``.

    Example:
        >>> type(default_metric(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))).__name__
        'MulticlassAccuracy'
        >>> type(default_metric(torch.randn(4, 1), torch.randn(4, 1))).__name__, default_metric([{}], [{}])
        ('MeanSquaredError', None)
    """
    preds = scored_output(outputs)
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor) or not preds.is_floating_point():
        return None
    if not target.is_floating_point() and target.dtype != torch.bool:
        classes = preds.shape[1] if preds.dim() >= 2 else 0
        if classes >= 2 and tuple(target.shape) == (preds.shape[0], *preds.shape[2:]):
            if preds.dim() == 2:
                return MulticlassAccuracy(num_classes=int(classes))
            return MulticlassJaccardIndex(num_classes=int(classes))
        return None
    if target.is_floating_point() and target.shape == preds.shape:
        return MeanSquaredError()
    return None


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        inner = f" of {_describe(value[0])}" if value else ""
        return f"a {type(value).__name__} of {len(value)}{inner}"
    return type(value).__name__ if value is not None else "None"


def _device_of(output: Any) -> torch.device:
    return next((t.device for t in tree_leaves(output) if isinstance(t, Tensor)), torch.device("cpu"))


def _batch_size(preds: Any, inputs: Any) -> int:
    if isinstance(preds, Tensor):
        return int(preds.shape[0]) if preds.dim() > 0 else 1
    if isinstance(preds, (list, tuple)):
        return len(preds)
    first = next((t for t in tree_leaves(inputs) if isinstance(t, Tensor) and t.dim() > 0), None)
    return int(first.shape[0]) if first is not None else 1


def _to(device: torch.device) -> Callable[[Any], Any]:
    return lambda t: t.to(device) if isinstance(t, Tensor) else t


def _as_float(preds: Any) -> Any:
    """Half-precision logits scored in float32, as the comparison runs."""
    if isinstance(preds, Tensor) and preds.is_floating_point():
        return preds.detach().to(torch.float32)
    return preds


def _to_floats(metric: Metric | MetricCollection) -> dict[str, float]:
    value = metric.compute()
    name = type(metric).__name__
    return _flatten(name, value) if not isinstance(metric, MetricCollection) else _flatten("", value)


def _flatten(prefix: str, value: Any) -> dict[str, float]:
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for key, sub in value.items():
            out.update(_flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return out
    if isinstance(value, (tuple, list)):
        out = {}
        for i, sub in enumerate(value):
            out.update(_flatten(f"{prefix}[{i}]", sub))
        return out
    if isinstance(value, Tensor):
        if value.numel() == 1:
            return {prefix: float(value)}
        return {f"{prefix}[{i}]": float(v) for i, v in enumerate(value.flatten())}
    if isinstance(value, numbers.Real):
        return {prefix: float(value)}
    raise TypeError(
        f"Verifier: the metric returned {type(value).__name__} for '{prefix}', expected tensors or numbers. "
        "Use a metric whose compute() returns a tensor or a dict of tensors."
    )


def check_tolerance(owner: str, name: str, value: Any) -> float:
    """``value`` as a float, checked for ``owner(name=value)``.

    Raises:
        TypeError: if it is not a real number (``bool`` included).
        ValueError: if it is NaN.
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{owner}({name}={value!r}) expects a number, got {type(value).__name__}, e.g. {name}=1e-3.")
    if math.isnan(float(value)):
        raise ValueError(f"{owner}({name}=nan) expects a number, e.g. {name}=1e-3.")
    return float(value)


def check_max_batches(owner: str, name: str, value: Any) -> None:
    """Check that a batch cap is ``None`` (all batches) or a positive integer (``ValueError`` if not)."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{owner}({name}={value!r}) expects a positive integer or None (all batches).")


def check_metric(owner: str, metric: Any) -> None:
    """Check that ``metric`` is ``None`` or a torchmetrics ``Metric``/``MetricCollection`` (``TypeError`` if not)."""
    if metric is not None and not isinstance(metric, (Metric, MetricCollection)):
        raise TypeError(
            f"{owner}(metric={metric!r}) expects a torchmetrics Metric or MetricCollection, got "
            f"{type(metric).__name__}. Pass e.g. metric=torchmetrics.classification.MulticlassAccuracy("
            "num_classes=10), or None."
        )


def check_callable(owner: str, name: str, fn: Any) -> None:
    """Check that ``fn`` is callable (``TypeError`` if not)."""
    if not callable(fn):
        raise TypeError(f"{owner}({name}=...) expects a function of the batch, got {type(fn).__name__}.")
