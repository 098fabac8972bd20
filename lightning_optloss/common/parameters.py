"""Resolve parameters given by object or by name (TF's ``variables`` and multiplier keys) on a module."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_optloss.common import validation

Value = TypeVar("Value")
ParameterKey = str | nn.Parameter


@dataclass(frozen=True)
class NamedParameter:
    """A parameter of the module, with its position among the module's distinct parameters and its name.

    ``index`` follows ``module.named_parameters()`` order; it places the parameter in the sequence that
    gradient noise is drawn for, so it must be the same in every process, which it is for the same module class.
    """

    index: int
    name: str
    param: nn.Parameter


class ModuleParameters:
    """The distinct parameters of a module, found by object or by any of their names (tied ones have two)."""

    def __init__(self, module: nn.Module, clean_name: Callable[[str], str] = str) -> None:
        self.ordered: list[NamedParameter] = [
            NamedParameter(index, clean_name(name), param)
            for index, (name, param) in enumerate(module.named_parameters())
        ]
        by_id = {id(entry.param): entry for entry in self.ordered}
        self.by_name: dict[str, NamedParameter] = {
            clean_name(name): by_id[id(param)] for name, param in module.named_parameters(remove_duplicate=False)
        }
        self.by_id = by_id

    def find(self, owner: str, argument: str, key: Any) -> NamedParameter:
        """The parameter a name or a parameter object denotes, or an error that says what names exist."""
        if isinstance(key, str):
            entry = self.by_name.get(key)
            if entry is None:
                close = difflib.get_close_matches(key, list(self.by_name), n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(
                    f"{owner}: `{argument}` names {key!r}, which is not a parameter of the module; "
                    f"its parameters are {validation.first_names(self.by_name)}.{hint}"
                )
            return entry
        if isinstance(key, torch.Tensor):
            entry = self.by_id.get(id(key))
            if entry is None:
                raise ValueError(
                    f"{owner}: `{argument}` holds a tensor of shape {tuple(key.shape)} that is not a "
                    "parameter "
                    "of the module (a copy, or a parameter of another module?). Pass the module's own "
                    "parameters or their names."
                )
            return entry
        raise validation.invalid(owner, argument, "parameter names (str) or parameters (nn.Parameter)", key)

    def select(self, owner: str, argument: str, selection: Iterable[ParameterKey] | None) -> list[NamedParameter]:
        """TF's ``variables``: all parameters with ``requires_grad`` when None, else exactly those given."""
        if selection is None:
            chosen = [entry for entry in self.ordered if entry.param.requires_grad]
            if not chosen:
                raise ValueError(f"{owner}: the module has no parameter with requires_grad=True to optimize.")
            return chosen
        chosen = []
        seen: dict[int, Any] = {}
        for key in selection:
            entry = self.find(owner, argument, key)
            if entry.index in seen:
                raise ValueError(
                    f"{owner}: `{argument}` lists parameter {entry.name!r} twice "
                    f"(as {_describe(seen[entry.index])} and {_describe(key)})."
                )
            if not entry.param.requires_grad:
                raise ValueError(
                    f"{owner}: `{argument}` lists {entry.name!r}, which has requires_grad=False and gets no "
                    "gradient; remove it or set requires_grad=True."
                )
            seen[entry.index] = key
            chosen.append(entry)
        if not chosen:
            raise validation.invalid(owner, argument, "None or a non-empty list of parameters", selection)
        return sorted(chosen, key=lambda entry: entry.index)

    def keyed(
        self, owner: str, argument: str, mapping: Mapping[Any, Value], allowed: list[NamedParameter]
    ) -> dict[int, Value]:
        """A dict keyed by parameter or name (TF's ``gradient_multipliers``) as ``{index: value}``.

        Unlike TF, which silently ignores them, a key that names no parameter, or one outside ``allowed``,
        is an error.
        """
        allowed_indices = {entry.index for entry in allowed}
        resolved: dict[int, Value] = {}
        for key, value in mapping.items():
            entry = self.find(owner, argument, key)
            if entry.index not in allowed_indices:
                raise ValueError(
                    f"{owner}: `{argument}` has a key for {entry.name!r}, which is not among the parameters "
                    f"this callback processes (`variables`: {validation.first_names(e.name for e in allowed)})."
                )
            if entry.index in resolved:
                raise ValueError(f"{owner}: `{argument}` has two keys for parameter {entry.name!r}.")
            resolved[entry.index] = value
        return resolved


def _describe(key: Any) -> str:
    return repr(key) if isinstance(key, str) else "a parameter object"
