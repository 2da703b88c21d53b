"""Callbacks that remember their constructor arguments, so that a callback and its config round-trip.

``callback.spec()`` is ``{"class_path", "init_args"}``, the form a config's ``trainer.callbacks`` holds, with
every argument (defaults included) as it was given; building the class from it gives a callback with the same
spec. Samplers do the same with :meth:`~lightning_ddpm.samplers.Sampler.spec`.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any

__all__ = ["Configurable", "from_spec", "public_path"]


class Configurable:
    """Mixin: records the arguments of the most derived ``__init__`` (a subclass's, when it has one)."""

    _init_args: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording(self: Any, *args: Any, **kw: Any) -> None:
            if "_init_args" not in self.__dict__:  # the outermost __init__ records; super().__init__ calls do not
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                self._init_args = {}
                for key, value in list(bound.arguments.items())[1:]:
                    kind = signature.parameters[key].kind
                    if kind is inspect.Parameter.VAR_KEYWORD:  # a subclass's **kwargs, passed on to its parent
                        self._init_args.update(value)
                    elif kind is not inspect.Parameter.VAR_POSITIONAL:
                        self._init_args[key] = value
            init(self, *args, **kw)

        cls.__init__ = recording  # type: ignore[method-assign]

    def spec(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}``: every constructor argument, defaults included."""
        return {"class_path": public_path(type(self)), "init_args": dict(self._init_args)}


def public_path(cls: type) -> str:
    """The shortest import path of ``cls``: ``lightning_ddpm.callbacks.EMA`` rather than ``...callbacks.ema.EMA``."""
    parts = cls.__module__.split(".")
    path = cls.__module__
    for i in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if getattr(module, cls.__qualname__, None) is not cls:
            break
        path = ".".join(parts[:i])
    return f"{path}.{cls.__qualname__}"


def from_spec(spec: dict[str, Any]) -> Any:
    """The object a ``{"class_path", "init_args"}`` mapping describes (no argument parsing: the values as given)."""
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    return cls(**spec.get("init_args", {}))
