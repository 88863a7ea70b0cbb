"""Method configs: frozen dataclasses that validate themselves and serialise to JSON.

Each pruning method defines one subclass of :class:`MethodConfig` and registers a
scoring function for it with :func:`register_method`. Configs are rebuilt from JSON only
through the registry (an allow-list of known classes), never by importing a name found
in a file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, ClassVar

from prunecli.errors import InputError, SparsityError

CONFIG_VERSION = 1

_REGISTRY: dict[str, tuple[type[MethodConfig], Callable[..., Any]]] = {}


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Options shared by every method.

    Args:
        sparsity: fraction of the parameters of the prunable blocks (attention + MLP of
            every layer) to remove, in (0, 1). This is the FLAP paper's definition.
        round_to: keep every pruned width (heads per layer, MLP channels) a multiple of
            this number where the group allows it.
        seed: seed for anything random in the method.
        ignore: qualified-name glob patterns of modules whose groups must not be pruned.
    """

    method: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False

    sparsity: float = 0.2
    round_to: int = 1
    seed: int = 0
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise SparsityError(f"sparsity must be a number, got {self.sparsity!r}")
        if not 0.0 < float(self.sparsity) < 1.0:
            raise SparsityError(
                f"sparsity must be strictly between 0 and 1, got {self.sparsity}",
                hint="use e.g. --sparsity 0.2 to remove 20% of the attention and MLP parameters",
            )
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise InputError(f"round_to must be a positive integer, got {self.round_to!r}")
        if isinstance(self.ignore, list):
            object.__setattr__(self, "ignore", tuple(self.ignore))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the method name and the config format version."""
        d = dataclasses.asdict(self)
        d["ignore"] = list(self.ignore)
        return {"method": self.method, "version": CONFIG_VERSION, "options": d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class DataMethodConfig(MethodConfig):
    """Options of a method that needs calibration data: how much of it, by default.

    Each method overrides the defaults with its paper's (or reference code's) calibration
    size; the CLI draws ``nsamples`` windows of ``seqlen`` tokens unless ``--nsamples`` /
    ``--seqlen`` say otherwise. :func:`prunecli.prune` uses whatever windows it is given.

    Args:
        nsamples: calibration windows.
        seqlen: tokens per calibration window.
    """

    needs_data: ClassVar[bool] = True

    nsamples: int = 128
    seqlen: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("nsamples", "seqlen"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")


@dataclasses.dataclass(frozen=True)
class TaskMethodConfig(MethodConfig):
    """Options of a method that learns from a labelled task (encoder heads), not calibration text.

    ``--sparsity`` is a share of each layer's attention heads; with ``drop_layers`` it may be
    ``0`` (drop layers only).

    Args:
        drop_layers: whole layers to remove (the layer-dropping setting).
        batch_size: examples per batch.
        max_length: tokens per example when the CLI reads the task.
    """

    needs_task: ClassVar[bool] = True
    sparsity_unit: ClassVar[str] = "heads"

    drop_layers: int = 0
    batch_size: int = 16
    max_length: int = 128

    def __post_init__(self) -> None:
        if (
            not isinstance(self.drop_layers, int)
            or isinstance(self.drop_layers, bool)
            or self.drop_layers < 0
        ):
            raise InputError(f"drop_layers must be a non-negative integer, got {self.drop_layers!r}")
        if self.drop_layers > 0 and self.sparsity == 0:
            object.__setattr__(self, "sparsity", 0.5)  # validated like any sparsity, then restored
            super().__post_init__()
            object.__setattr__(self, "sparsity", 0.0)
        else:
            super().__post_init__()
        for name in ("batch_size", "max_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")


def register_method(config_cls: type[MethodConfig]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(model, graph, config, calib) -> Plan`` as the method for ``config_cls``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not config_cls.method:
            raise TypeError(f"{config_cls.__name__} has no method name")
        _REGISTRY[config_cls.method] = (config_cls, fn)
        return fn

    return wrap


def method_names() -> list[str]:
    """Names of every registered method (importing the method modules first)."""
    import prunecli.methods  # noqa: F401  (registers the built-in methods)

    return sorted(_REGISTRY)


def get_method(name: str) -> tuple[type[MethodConfig], Callable[..., Any]]:
    """Config class and prune function registered under ``name``."""
    import prunecli.methods  # noqa: F401

    if name not in _REGISTRY:
        raise InputError(
            f"unknown method {name!r}",
            hint=f"choose one of: {', '.join(sorted(_REGISTRY))}",
        )
    return _REGISTRY[name]


def config_from_dict(d: dict[str, Any]) -> MethodConfig:
    """Rebuild a config from :meth:`MethodConfig.to_dict` output (allow-listed classes only)."""
    if not isinstance(d, dict) or "method" not in d:
        raise InputError("a method config must be a mapping with a 'method' key")
    version = d.get("version", CONFIG_VERSION)
    if version > CONFIG_VERSION:
        raise InputError(f"config version {version} is newer than this prunecli understands")
    cls, _ = get_method(d["method"])
    options = dict(d.get("options", {}))
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise InputError(f"unknown option(s) for method {d['method']!r}: {', '.join(unknown)}")
    if "ignore" in options:
        options["ignore"] = tuple(options["ignore"])
    return cls(**options)
