"""Test-side loader of the k-diffusion package's `sampling.py`, `external.py` and `utils.py`.

k-diffusion's package `__init__` imports heavy optional modules, and its `utils.py` imports
torchvision at the top (unused on the sampling path; PyPI's torchvision does not import beside
this torch). The three files are loaded by path under a stand-in package, with an empty
stand-in torchvision present only while they load, so no other test sees it.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

PACKAGE = "kdiffusion_reference"
_STUBS = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def _package_dir() -> Path:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (it is a test dependency)")
    return Path(next(iter(spec.submodule_search_locations)))


def load_kdiffusion() -> types.SimpleNamespace:
    """Namespace with the reference `sampling`, `external` and `utils` modules (loaded once)."""
    if PACKAGE in sys.modules:
        package = sys.modules[PACKAGE]
        return types.SimpleNamespace(sampling=package.sampling, external=package.external, utils=package.utils)
    directory = _package_dir()
    saved = {name: sys.modules.get(name) for name in _STUBS}
    stubs = {name: types.ModuleType(name) for name in _STUBS}
    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(directory)]
    sys.modules[PACKAGE] = package
    try:
        sys.modules.update(stubs)
        for name in ("utils", "sampling", "external"):
            spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{name}", directory / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            setattr(package, name, module)
    except BaseException:
        for name in ("utils", "sampling", "external"):
            sys.modules.pop(f"{PACKAGE}.{name}", None)
        sys.modules.pop(PACKAGE, None)
        raise
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return types.SimpleNamespace(sampling=package.sampling, external=package.external, utils=package.utils)
