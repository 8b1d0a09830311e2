"""``aoti``: an AOTInductor package (``torch._inductor.aoti_compile_and_package``), run by ``aoti_load_package``.

The package is compiled ahead of time to C++ for the CPU (the device of the network), so writing it needs a C++
compiler (``g++``, or ``$CXX``). The defaults make it fast there without autotuning: ``freezing=True`` folds the
weights into the graph as constants and lets inductor pre-pack convolution and linear weights for oneDNN
(``cpp.weight_prepack``, on by default). ``max_autotune`` is left off: it benchmarks GEMM templates at compile
time and takes minutes on a small CPU. The kernels use the thread count current at compile time; pass
``inductor_configs={"cpp.dynamic_threads": True}`` for a package that follows ``torch.set_num_threads`` at run time.

Options:

* ``inductor_configs``: ``torch._inductor.config`` settings, merged over :data:`DEFAULT_INDUCTOR_CONFIGS`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fx_lightning.deploy.formats.base import (
    Exporter,
    ExportJob,
    LoadContext,
    MissingCompilerError,
    Runner,
    on_device,
    reject_unknown,
)
from fx_lightning.errors import first_line

#: Inductor settings an AOTI package is compiled with unless ``inductor_configs`` says otherwise.
DEFAULT_INDUCTOR_CONFIGS: dict[str, Any] = {"freezing": True}
SUFFIX = ".aoti.pt2"  # aoti_compile_and_package wants a .pt2 name; ".aoti" tells it from a torch.export program


def check_aoti(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options with the inductor settings completed, after checking that a C++ compiler is found.

    Raises:
        ValueError: for an unknown option, or an ``inductor_configs`` that is not a dict of known settings.
        MissingCompilerError: (a ``RuntimeError``) when no C++ compiler works.
    """
    reject_unknown("aoti", options, ("inductor_configs",))
    configs = options.get("inductor_configs") or {}
    if not isinstance(configs, Mapping) or not all(isinstance(k, str) for k in configs):
        raise ValueError(
            f"export options {{'aoti': {{'inductor_configs': {configs!r}}}}} expects a dict of torch._inductor.config "
            "settings, e.g. {'freezing': True}."
        )
    merged = {**DEFAULT_INDUCTOR_CONFIGS, **configs}
    from torch._inductor import config as inductor_config

    try:
        with inductor_config.patch(merged):
            find_compiler()
    except (AttributeError, KeyError) as err:
        raise ValueError(
            f"export options {{'aoti': {{'inductor_configs': {dict(configs)!r}}}}} names a setting torch "
            f"{torch.__version__} does not have: {first_line(err)}. See torch/_inductor/config.py for the settings."
        ) from err
    return {"inductor_configs": merged}


def find_compiler() -> str:
    """The C++ compiler inductor will use, found as inductor finds it (``torch._inductor.config.cpp.cxx``).

    Raises:
        MissingCompilerError: naming what was searched and how to provide a compiler.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as err:
        searched = [c for c in _as_tuple(inductor_config.cpp.cxx) if c is not None]
        raise MissingCompilerError(
            f"needs a C++ compiler to build the AOTInductor package, and none "
            f"works here: tried {searched} (torch._inductor.config.cpp.cxx; $CXX={os.environ.get('CXX', '')!r}). "
            "Install one (e.g. apt-get install g++), or set CXX=/path/to/g++, or leave 'aoti' out of formats."
        ) from err


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def write_aoti(job: ExportJob, stem: Path, options: Mapping[str, Any]) -> Path:
    """Compile the job's ``torch.export`` program into the AOTInductor package ``<stem>.aoti.pt2``."""
    from torch._inductor import aoti_compile_and_package

    path = stem.with_name(stem.name + SUFFIX)
    program = job.program("aoti")
    try:
        aoti_compile_and_package(program, package_path=str(path), inductor_configs=dict(options["inductor_configs"]))
    except Exception as err:
        doing = f"compile {type(job.module).__name__} with AOTInductor"
        raise job.failed("aoti", doing, err, ["pt2", "onnx", "weights"]) from err
    return path


def load_aoti(path: Path, context: LoadContext) -> Runner:
    """The compiled package, loaded with ``torch._inductor.aoti_load_package``."""
    from torch._inductor import aoti_load_package

    compiled = aoti_load_package(str(path))
    return on_device(compiled, context.module)


def aoti_runtime(options: Mapping[str, Any]) -> str:
    configs = {**DEFAULT_INDUCTOR_CONFIGS, **(options.get("inductor_configs") or {})}
    settings = ", ".join(f"{k}={v!r}" for k, v in configs.items())
    return f"AOTInductor (torch {torch.__version__.split('+')[0]}; {settings})"


AOTI = Exporter(name="aoti", write=write_aoti, load=load_aoti, runtime=aoti_runtime, check=check_aoti)
