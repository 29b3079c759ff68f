"""Register rocket-deploy's transformers quantizer (``quant_method: "rocket"``) without importing transformers.

``import rocket_deploy`` stays light (tests/ground/test_lean_import.py), yet ``from_pretrained`` must find the
quantizer. transformers resolves quantizers in ``transformers.quantizers.auto``, which every model load imports
(``modeling_utils`` does) and a tokenizer / config load does not. So: when that module is already imported, the
quantizer (:mod:`rocket_deploy.hf_quantizer`) is registered at once; otherwise a one-shot ``sys.meta_path`` finder
wraps the module's loader and registers right after the module has executed -- no ``.pth`` file, no cost for
programs that never load a model. Should registration fail, the artifact's config.json still makes transformers
refuse it (never random weights), see :mod:`rocket_deploy.hf_quantizer`. Standard library only.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings

TARGET = "transformers.quantizers.auto"


def _register() -> None:
    try:
        importlib.import_module("rocket_deploy.hf_quantizer")
    except Exception as e:  # noqa: BLE001 -- never break `import transformers`; the config guard still refuses
        warnings.warn(f"rocket-deploy could not register its transformers quantizer ({type(e).__name__}: {e}); "
                      f"from_pretrained will refuse rocket-deploy artifacts -- use rocket_deploy.load instead",
                      RuntimeWarning, stacklevel=2)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _register()

    def __getattr__(self, name):            # get_source, get_filename ... for tools that ask the loader
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        uninstall()
        spec = None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


_FINDER = _Finder()


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Register now if transformers' quantizer table is loaded, else when it gets imported."""
    if TARGET in sys.modules:
        _register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
