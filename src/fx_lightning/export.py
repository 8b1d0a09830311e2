"""Deploy artifacts of a (fused) network, each reloaded and checked, and the checkpoint form of a fused network.

* :func:`export_artifacts` writes ``torch.export`` programs (``.pt2``), ONNX files and plain weights, reloads
  each one and compares its outputs with the module's before returning the paths.
* :func:`checkpoint_state_dict` (from :mod:`fx_lightning.checkpoint`, re-exported here) expresses a fused network
  in the original architecture's state-dict keys, so a checkpoint keeps loading into the user's own class.

Nothing here imports Lightning, and onnx/onnxruntime are imported only when the ONNX format is asked for.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim
from torch.utils._pytree import tree_leaves, tree_map

from fx_lightning.checkpoint import checkpoint_state_dict

FORMATS = ("pt2", "onnx", "weights")
_ONNX_INLINE_LIMIT = 1 << 30  # bytes of parameters above which ONNX weights go to an external data file


Runner = Callable[[tuple[Any, ...]], Any]


__all__ = ["FORMATS", "MissingExtraError", "checkpoint_state_dict", "export_artifacts"]


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency of fx-lightning is not installed; the message names the pip extra to install."""


# ----------------------------------------------------------------------------------------- export_artifacts


def export_artifacts(
    module: nn.Module,
    example_inputs: Sequence[Any],
    directory: str | Path,
    formats: Sequence[str] = ("pt2", "weights"),
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    name: str = "model",
    dynamic_batch: bool = False,
) -> dict[str, Path]:
    """Write ``module`` in each format to ``directory``, reload every file and check it against ``module``.

    Formats:

    * ``"pt2"``: ``torch.export.export`` + ``torch.export.save`` (``<name>.pt2``); reloaded with
      ``torch.export.load(path).module()``.
    * ``"onnx"``: ``torch.onnx.export`` (``<name>.onnx``); checked with ``onnx.checker`` and run with
      onnxruntime on the CPU. Needs ``pip install "fx-lightning[onnx]"``.
    * ``"weights"``: the state dict as ``<name>.safetensors`` when safetensors is installed, else
      ``<name>.pt`` (loadable with ``torch.load(path, weights_only=True)``); reloaded into a copy of the
      module's structure whose values were wiped first.

    Args:
        module: the network to export, usually the eval-mode result of :func:`fx_lightning.fuse`.
        example_inputs: positional inputs for one forward call, e.g. ``(torch.randn(1, 3, 32, 32),)``.
        directory: where to write; created if missing.
        formats: which artifacts to write, any of ``"pt2"``, ``"onnx"``, ``"weights"``.
        rtol: relative tolerance of the reload check (``|out - ref| <= atol + rtol * |ref|``).
        atol: absolute tolerance of the reload check.
        name: file name stem.
        dynamic_batch: export ``pt2``/``onnx`` with a dynamic dim 0 on every tensor input, and check the
            reloaded artifacts on a batch twice as large as well. Needs example inputs with batch size >= 2
            (``torch.export`` specialises size 1).

    Returns:
        The path of each artifact by format.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if a format is unknown, a tolerance is negative or ``name`` is not a plain file name.
        MissingExtraError: (a ``ModuleNotFoundError``) if ``"onnx"`` is asked for without onnx/onnxruntime.
        RuntimeError: if an export fails, a reloaded artifact's outputs differ beyond the tolerance, or (with
            ``dynamic_batch``) an artifact does not accept another batch size.

    Example:
        >>> import tempfile
        >>> net = nn.Sequential(nn.Linear(4, 2)).eval()
        >>> paths = export_artifacts(net, (torch.randn(1, 4),), tempfile.mkdtemp(), formats=["weights"])
        >>> sorted(paths), paths["weights"].suffix in (".safetensors", ".pt")
        (['weights'], True)
    """
    chosen = _validate_export(module, example_inputs, formats, rtol, atol, name)
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"export_artifacts(dynamic_batch={dynamic_batch!r}) expects True or False.")
    inputs = tuple(example_inputs)
    dynamic_shapes = _batch_dynamic_shapes(inputs) if dynamic_batch else None
    checks = [inputs, _doubled_batch(inputs)] if dynamic_batch else [inputs]
    with torch.no_grad():
        references = [module(*inputs)]
        if dynamic_batch:
            try:
                references.append(module(*checks[1]))
            except Exception as err:
                raise RuntimeError(
                    f"export_artifacts(dynamic_batch=True): {type(module).__name__} itself fails on a batch twice as "
                    f"large as the example: {type(err).__name__}: {_first_line(err)}. Export with dynamic_batch=False."
                ) from err
    out_dir = Path(directory).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)

    paths: dict[str, Path] = {}
    program: torch.export.ExportedProgram | None = None
    for fmt in chosen:
        if fmt == "pt2":
            program = _export_program(module, inputs, dynamic_shapes)
            path, run = _write_pt2(program, out_dir / f"{name}.pt2")
        elif fmt == "onnx":
            path, run = _write_onnx(module, program, inputs, dynamic_shapes, out_dir / f"{name}.onnx")
        else:
            path, run = _write_weights(module, out_dir, name)
        for args, reference in zip(checks, references):
            try:
                with torch.no_grad():
                    outputs = run(args)
            except Exception as err:
                if args is inputs:
                    raise
                raise RuntimeError(
                    f"export_artifacts(dynamic_batch=True): the reloaded '{fmt}' artifact {path} does not accept a "
                    f"batch of another size: {type(err).__name__}: {_first_line(err)}. The forward fixes the batch "
                    "size somewhere (e.g. a reshape to a constant); export with dynamic_batch=False."
                ) from err
            _check_close(fmt, path, tree_leaves(outputs), tree_leaves(reference), rtol, atol)
        paths[fmt] = path
    return paths


def _doubled_batch(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tree_map(lambda t: torch.cat([t, t]) if isinstance(t, Tensor) and t.dim() > 0 else t, inputs)


def _batch_dynamic_shapes(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    batch_sizes = {t.shape[0] for t in tree_leaves(inputs) if isinstance(t, Tensor) and t.dim() > 0}
    if batch_sizes & {0, 1}:
        raise ValueError(
            f"export_artifacts(dynamic_batch=True) needs example inputs with batch size >= 2, got batch size(s) "
            f"{sorted(batch_sizes)}: torch.export treats sizes 0 and 1 as constants. Pass e.g. (x.repeat(2, 1, 1, 1),)."
        )
    return tree_map(lambda t: {0: Dim.AUTO} if isinstance(t, Tensor) and t.dim() > 0 else None, inputs)


def _validate_export(module: Any, example_inputs: Any, formats: Any, rtol: Any, atol: Any, name: Any) -> list[str]:
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"export_artifacts(module=...) expects a torch.nn.Module, got {type(module).__name__}. "
            "Pass the network, e.g. export_artifacts(fuse(model.net), (x,), 'out')."
        )
    if isinstance(example_inputs, (Tensor, str)) or not isinstance(example_inputs, Sequence):
        raise TypeError(
            f"export_artifacts(example_inputs=...) expects a tuple of positional inputs, got "
            f"{type(example_inputs).__name__}. Wrap a single tensor: example_inputs=(x,)."
        )
    if isinstance(formats, str):
        formats = [formats]
    if not isinstance(formats, Sequence) or not all(isinstance(f, str) for f in formats):
        raise TypeError(
            f"export_artifacts(formats={formats!r}) expects a list of format names from {list(FORMATS)}, "
            "e.g. formats=['pt2', 'weights']."
        )
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(
            f"export_artifacts(formats={list(formats)!r}) names unknown format(s) {unknown}. "
            f"Valid formats: {list(FORMATS)}."
        )
    for label, value in (("rtol", rtol), ("atol", atol)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value) or value < 0:
            raise ValueError(f"export_artifacts({label}={value!r}) expects a number >= 0, e.g. {label}=1e-5.")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(
            f"export_artifacts(name={name!r}) expects a plain file name stem such as 'model'; put folders in "
            "directory=... instead."
        )
    return list(dict.fromkeys(formats))


def _export_program(
    module: nn.Module, inputs: tuple[Any, ...], dynamic_shapes: tuple[Any, ...] | None
) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes)
    except Exception as err:
        raise RuntimeError(
            f"export_artifacts(formats=['pt2']): torch.export.export could not capture {type(module).__name__}: "
            f"{type(err).__name__}: {_first_line(err)} (full error above). Export the other formats with "
            "formats=['weights'], or make the "
            "forward exportable (no branches on tensor values)."
        ) from err


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def _write_pt2(program: torch.export.ExportedProgram, path: Path) -> tuple[Path, Runner]:
    torch.export.save(program, path)
    reloaded = torch.export.load(path).module()
    return path, lambda args: reloaded(*args)


def _write_onnx(
    module: nn.Module,
    program: torch.export.ExportedProgram | None,
    inputs: tuple[Any, ...],
    dynamic_shapes: tuple[Any, ...] | None,
    path: Path,
) -> tuple[Path, Runner]:
    onnx, ort = _import_onnx()
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    try:
        torch.onnx.export(
            program if program is not None else module,
            inputs,
            str(path),
            dynamic_shapes=dynamic_shapes if program is None else None,
            dynamo=True,
            external_data=param_bytes > _ONNX_INLINE_LIMIT,
            verbose=False,
        )
        onnx.checker.check_model(str(path))
    except Exception as err:
        raise RuntimeError(
            f"export_artifacts(formats=['onnx']) could not export {type(module).__name__}: "
            f"{type(err).__name__}: {_first_line(err)} (full error above). Export the other formats with "
            "formats=['pt2', 'weights']."
        ) from err
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(args: tuple[Any, ...]) -> list[Tensor]:
        tensors = [t for t in tree_leaves(args) if isinstance(t, Tensor)]
        feeds = {arg.name: t.detach().cpu().numpy() for arg, t in zip(session.get_inputs(), tensors)}
        return [torch.from_numpy(o) for o in session.run(None, feeds)]

    return path, run


def _import_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise MissingExtraError(
            f"export_artifacts(formats=['onnx']) needs onnx, onnxruntime and onnxscript ({err}). "
            'Install them with: pip install "fx-lightning[onnx]"'
        ) from err
    return onnx, onnxruntime


def _write_weights(module: nn.Module, directory: Path, name: str) -> tuple[Path, Runner]:
    # Plain contiguous CPU copies: safetensors refuses shared or strided storage, and the file must not
    # depend on the device the module ran on.
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}
    save, load, suffix = _weights_backend()
    path = directory / f"{name}{suffix}"
    save(state, path)

    restored = copy.deepcopy(module)
    with torch.no_grad():
        # Wipe every saved value first, so the check proves the file restores all of them.
        for value in restored.state_dict(keep_vars=True).values():
            if value.is_floating_point():
                value.fill_(math.nan)
    restored.load_state_dict(load(path), strict=True)
    return path, lambda args: restored(*args)


def _weights_backend() -> tuple[Callable[[dict[str, Tensor], Path], None], Callable[[Path], Any], str]:
    try:
        from safetensors.torch import load_file, save_file
    except ImportError:
        return (
            lambda state, path: torch.save(state, path),
            lambda path: torch.load(path, map_location="cpu", weights_only=True),
            ".pt",
        )
    return (lambda state, path: save_file(state, str(path))), (lambda path: load_file(str(path))), ".safetensors"


def _check_close(fmt: str, path: Path, outputs: list[Any], references: list[Any], rtol: float, atol: float) -> None:
    refs = [r for r in references if isinstance(r, Tensor)]
    outs = [o for o in outputs if isinstance(o, Tensor)]
    if len(outs) != len(refs):
        raise RuntimeError(
            f"export_artifacts: the reloaded '{fmt}' artifact {path} returned {len(outs)} tensor(s), the module "
            f"{len(refs)}. The format does not preserve this module's outputs; choose another format."
        )
    worst_abs, worst_rel, ok = 0.0, 0.0, True
    for out, ref in zip(outs, refs):
        if out.shape != ref.shape:
            raise RuntimeError(
                f"export_artifacts: the reloaded '{fmt}' artifact {path} returned shape {tuple(out.shape)}, the "
                f"module {tuple(ref.shape)}."
            )
        out64 = out.detach().cpu().to(torch.float64)
        ref64 = ref.detach().cpu().to(torch.float64)
        err = (out64 - ref64).abs()
        if err.numel():
            worst_abs = max(worst_abs, float(err.max()))
            worst_rel = max(worst_rel, float((err / ref64.abs().clamp_min(1e-12)).max()))
        ok = ok and bool(torch.isclose(out64, ref64, rtol=rtol, atol=atol, equal_nan=True).all())
    if not ok:
        raise RuntimeError(
            f"export_artifacts: the reloaded '{fmt}' artifact {path} differs from the module: max abs error "
            f"{worst_abs:.3e}, max rel error {worst_rel:.3e}, tolerance rtol={rtol:g}, atol={atol:g}. "
            "Check that the module is deterministic and in eval mode, or loosen rtol/atol."
        )
