"""What determines a trained model: every constructor argument, and the code that training runs.

    class ArcFace(HParams, nn.Module): ...
    ArcFace(512, 1000, m=0.4).hparams     # {"in_features": 512, "num_classes": 1000, "s": 64.0, "m": 0.4}
    describe(head)                        # {"type": "frlab.heads.ArcFace", "hparams": {...}}, JSON-ready
    code_digest(model, head, data)        # a digest of the source files their classes come from

`HParams` records the arguments of the outermost constructor, defaults filled in, as they were
passed: no class keeps a hand-written list of what matters, so a new argument cannot be left out
of a model cache key. `code_digest` follows each object's classes (their bases, sub-modules and
hyper-parameters) to the files that define them and the frlab modules those files import: a cache
keyed by it is invalidated by a change to a head or to the renderer, not by one to a figure.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import sys
import types
from pathlib import Path
from typing import Any


class HParams:
    """Mixin: `self.hparams` holds the arguments the object was constructed with (defaults
    included, `*args` / `**kwargs` spread out). Put it before `nn.Module` in the bases."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__init__)

    @property
    def hparams(self) -> dict[str, Any]:
        return dict(self.__dict__.get("_hparams", {}))

    def extra_repr(self) -> str:  # nn.Module's repr line: the hyper-parameters (modules print themselves)
        import torch

        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items() if not isinstance(v, torch.nn.Module))


def _recording(init):
    sig = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if "_hparams" not in self.__dict__:  # the outermost constructor: the arguments the caller gave
            bound = sig.bind(self, *args, **kwargs)
            bound.apply_defaults()
            found = {}
            for name, value in list(bound.arguments.items())[1:]:
                kind = sig.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    found.update(value)
                elif kind is inspect.Parameter.VAR_POSITIONAL:
                    found.update({f"{name}[{i}]": v for i, v in enumerate(value)})
                else:
                    found[name] = value
            object.__setattr__(self, "_hparams", found)
        init(self, *args, **kwargs)

    return __init__


def _qualname(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def describe(obj: Any) -> Any:
    """A JSON-ready description of a value, precise enough to key a cache: modules and other
    HParams objects by type and hyper-parameters (recursively), dataclasses by their fields, classes
    and functions by name, tensors by their bytes."""
    import torch

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [describe(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        return {
            "tensor": list(t.shape),
            "dtype": str(t.dtype),
            "sha": hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16],
        }
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType, functools.partial)):
        if isinstance(obj, functools.partial):
            return {"partial": describe(obj.func), "args": describe(obj.args), "kwargs": describe(obj.keywords)}
        return {"callable": _qualname(obj)}
    if isinstance(obj, HParams):
        return {"type": _qualname(type(obj)), "hparams": describe(obj.hparams)}
    if dataclasses.is_dataclass(obj):
        return {
            "type": _qualname(type(obj)),
            **{f.name: describe(getattr(obj, f.name)) for f in dataclasses.fields(obj)},
        }
    if isinstance(obj, torch.nn.Module):  # a module frlab did not write: its repr is all we know
        return {"type": _qualname(type(obj)), "repr": repr(obj)}
    return {"type": _qualname(type(obj)), "repr": repr(obj)}


# ---------------------------------------------------------------- the code training depends on
def _frlab_module(name: str):
    return sys.modules.get(name) if name == "frlab" or name.startswith("frlab.") else None


def _imports(module: types.ModuleType) -> set[types.ModuleType]:
    """The frlab modules a module refers to in its globals (imported modules, classes, functions)."""
    found = set()
    for value in vars(module).values():
        if isinstance(value, types.ModuleType):
            m = _frlab_module(value.__name__)
        else:
            m = _frlab_module(getattr(value, "__module__", None) or "")
        if m is not None and m is not module:
            found.add(m)
    return found


def _collect(objects) -> tuple[set[types.ModuleType], dict[str, type]]:
    """The frlab modules and the outside classes (neither frlab's nor torch's) behind `objects`."""
    import torch

    modules: set[types.ModuleType] = set()
    outside: dict[str, type] = {}
    seen: set[int] = set()

    def add(cls_or_fn):
        name = getattr(cls_or_fn, "__module__", "") or ""
        m = _frlab_module(name)
        if m is not None:
            modules.add(m)
        elif name.split(".")[0] not in ("torch", "builtins", "functools", "typing", "abc", "collections", "enum"):
            outside[_qualname(cls_or_fn)] = cls_or_fn

    def visit(obj):
        if id(obj) in seen or obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple, set)):
            return [visit(v) for v in obj]
        if isinstance(obj, dict):
            return [visit(v) for v in obj.values()]
        if isinstance(obj, functools.partial):
            return visit([obj.func, obj.args, obj.keywords])
        if isinstance(obj, types.FunctionType):
            return add(obj)
        for c in (obj if isinstance(obj, type) else type(obj)).__mro__:
            add(c)
        if isinstance(obj, torch.nn.Module):
            visit([sub for sub in obj.modules() if sub is not obj])
        if isinstance(obj, HParams):
            visit(list(obj.hparams.values()))
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            visit([getattr(obj, f.name) for f in dataclasses.fields(obj)])

    visit(list(objects))
    todo = list(modules)
    while todo:
        for m in _imports(todo.pop()):
            if m not in modules:
                modules.add(m)
                todo.append(m)
    return modules, outside


def code_files(*objects: Any) -> list[Path]:
    """The frlab source files that the classes of `objects` come from (with their bases, the classes
    of their sub-modules, of their hyper-parameters and of the values those hold), closed over the
    frlab modules each file imports."""
    modules, _ = _collect(objects)
    return sorted(Path(m.__file__) for m in modules if getattr(m, "__file__", None))


def code_digest(*objects: Any) -> str:
    """A digest of `code_files(*objects)` (paths relative to the package, and their bytes), plus
    the source of every class or function among them that frlab did not write (a head defined in a
    notebook), where it can be read."""
    import frlab

    root = Path(frlab.__file__).resolve().parent
    modules, outside = _collect(objects)
    h = hashlib.sha256()
    for f in sorted(Path(m.__file__).resolve() for m in modules if getattr(m, "__file__", None)):
        h.update(str(f.relative_to(root) if f.is_relative_to(root) else f.name).encode() + f.read_bytes())
    for name, obj in sorted(outside.items()):
        try:
            h.update(inspect.getsource(obj).encode())
        except (OSError, TypeError):
            h.update(name.encode())
    return h.hexdigest()[:16]
