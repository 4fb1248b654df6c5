"""Reading pickled checkpoints from elsewhere without running their code.

The field's released weights are pickles of more than tensors: OpenAI's dVAE files are whole pickled
``nn.Module`` trees of the ``dall-e`` package, a taming VQGAN ``.ckpt`` carries OmegaConf and Lightning objects
beside its ``state_dict``. ``torch.load(weights_only=True)`` refuses them, and ``weights_only=False`` would run
whatever a downloaded file names. :func:`load_untrusted` takes the middle road: tensors, parameters and plain
containers rebuild as usual; an object of a class from one of the caller's ``inert`` module prefixes comes back
as an :class:`Inert` record (its class name and pickled state, no method of that class run, the class never
imported); any other global refuses the whole file, naming it.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import types
from typing import Any

import torch

# Globals a tensor checkpoint needs, each harmless to call: containers, tensor and parameter rebuilders, the
# two copyreg helpers that build (inert) instances, and torch's value types.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"), ("builtins", "object"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "slice"), ("builtins", "complex"), ("copyreg", "_reconstructor"), ("copyreg", "__newobj__"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "device"), ("torch", "Size"),
    # OmegaConf metadata names plain types as values (object_type=dict, key_type=int) and keeps a defaultdict.
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "int"), ("collections", "defaultdict"),
}


class RefusedGlobal(pickle.UnpicklingError):
    """The file names a global outside the allowed set; nothing from it was run."""


class Inert:
    """Stands for an object of a class this process does not trust: ``cls`` is the original ``module.name``,
    ``state`` what its pickle held (usually its ``__dict__``), ``args`` any constructor arguments."""

    cls = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        record = super().__new__(cls)
        record.args, record.state = args, None
        return record

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # pickled dict subclasses set their items
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:  # ... and list subclasses append theirs
        self.__dict__.setdefault("items", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("items", []).extend(values)

    def __repr__(self) -> str:
        return f"Inert({self.cls})"


def _inert_class(module: str, name: str) -> type[Inert]:
    return types.new_class(name, (Inert,), {}, lambda ns: ns.update(cls=f"{module}.{name}"))


def _restricted_pickle_module(inert: tuple[str, ...], where: str) -> types.ModuleType:
    inert_classes: dict[tuple[str, str], type[Inert]] = {}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            # torch saves with protocol 2, which spells builtins the Python 2 way (``__builtin__.set``).
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            if (module, name) in _SAFE_GLOBALS:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            if any(module == prefix or module.startswith(prefix + ".") for prefix in inert):
                return inert_classes.setdefault((module, name), _inert_class(module, name))
            raise RefusedGlobal(f"{where}: refuses to load {module}.{name} (only tensors, plain "
                                         f"containers and objects of {', '.join(inert)} are read)")

    module = types.ModuleType("restricted_pickle")
    module.Unpickler = RestrictedUnpickler
    module.load = lambda file, **kw: RestrictedUnpickler(file, **kw).load()
    module.__name__ = pickle.__name__  # torch.load checks the module it is given only by its attributes
    return module


def load_untrusted(data: bytes, where: str, inert: tuple[str, ...]) -> Any:
    """``torch.load`` of ``data`` (zip or legacy format) that runs no code from it; see the module docstring."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False,
                          pickle_module=_restricted_pickle_module(inert, where))
    except RefusedGlobal:
        raise
    except Exception as exc:
        raise ValueError(f"{where}: not a readable torch file ({exc})") from exc


def module_tensors(record: Inert, prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``state_dict`` of an inert ``nn.Module`` tree: its parameters and buffers by dotted name."""
    state = record.state if isinstance(record, Inert) else None
    if not isinstance(state, dict) or "_modules" not in state:
        raise ValueError(f"{prefix or 'the file'} is not a pickled torch module ({record!r})")
    tensors: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is not None:
                tensors[prefix + name] = value.detach() if isinstance(value, torch.Tensor) else value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            tensors.update(module_tensors(child, f"{prefix}{name}."))
    return tensors


def load_exactly(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str, hint: str = "") -> None:
    """``module.load_state_dict(tensors)`` for weights from elsewhere: every key and shape must match, and the
    ValueError names the first that does not (``hint`` says what to check)."""
    expected = module.state_dict()
    missing, unexpected = [k for k in expected if k not in tensors], [k for k in tensors if k not in expected]
    if missing or unexpected:
        key, what = (missing[0], "missing") if missing else (unexpected[0], "unexpected")
        raise ValueError(f"{where}: parameter {key} {what} ({len(missing)} missing, {len(unexpected)} "
                         f"unexpected){hint}")
    for key, value in expected.items():
        got = tensors[key]
        if not isinstance(got, torch.Tensor) or got.shape != value.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ValueError(f"{where}: {key} has shape {shape}, expected {tuple(value.shape)}{hint}")
    module.load_state_dict({k: v.float() for k, v in tensors.items()})
