"""``python -m lightning_optloss.tf_checkpoint inspect PATH [--module pkg.Module]``: a dry run of TFCheckpoint.

Prints the checkpoint's variables by role (model variables, optimizer slots, optimizer variables, the global
step), the parameter each model variable would load into with the layout change, and what is left over on
both sides, with the closest names: what to put into ``name_map``. Exit status 0 when everything matches, 1
when something is left over, 2 for bad arguments or an unreadable checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import numpy as np
from torch import nn

from lightning_optloss.tf.checkpoint_names import (
    KERNEL_PERMUTATIONS,
    TFCheckpointReader,
    default_name,
    match_names,
    resolve_prefix,
    sort_variables,
    tensor_names,
)

_OWNER = "tf_checkpoint inspect"


def load_module(path: str) -> nn.Module:
    """``pkg.mod.Class`` (or ``pkg.mod:Class``) instantiated without arguments."""
    module_name, _, attribute = path.replace(":", ".").rpartition(".")
    if not module_name:
        raise ValueError(f"--module {path!r}: expected a dotted path such as 'my_package.models.Net'.")
    cls = getattr(importlib.import_module(module_name), attribute, None)
    if cls is None:
        raise ValueError(f"--module {path!r}: {module_name} has no attribute {attribute!r}.")
    module = cls()
    if not isinstance(module, nn.Module):
        raise ValueError(f"--module {path!r} built a {type(module).__name__}, not a torch nn.Module.")
    return module


def _layout(tf_name: str, ndim: int) -> str:
    if tf_name.rsplit("/", 1)[-1] == "kernel" and ndim in KERNEL_PERMUTATIONS:
        return f"  transposed {KERNEL_PERMUTATIONS[ndim][1]}"
    return ""


def report(prefix: str, module: nn.Module | None, scope: str) -> tuple[list[str], bool]:
    """The lines ``inspect`` prints, and whether everything matched."""
    reader = TFCheckpointReader(_OWNER, prefix)
    kinds = sort_variables(reader.shapes, [scope])
    lines = [f"TF checkpoint {prefix}"]
    if kinds.global_step is not None:
        lines.append(f"global_step: {int(np.asarray(reader.get(kinds.global_step)))}")
    tensors: dict[str, bool] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    if module is not None:
        tensors = tensor_names(module)
        shapes = {name: tuple(t.shape) for name, t in [*module.named_parameters(), *module.named_buffers()]}
    match = match_names(_OWNER, kinds.model, tensors, None) if module is not None else None
    lines.append(f"model variables ({len(kinds.model)}):")
    for name in kinds.model:
        shape = list(reader.shapes[name])
        if match is None:
            target = f"-> {default_name(name)} (default name)"
        elif name in match.pairs:
            torch_name = match.pairs[name]
            target = f"-> {torch_name} {list(shapes[torch_name])}{_layout(name, len(shape))}"
        else:
            target = "-> (unused)"
        slots = ", ".join(sorted(kinds.slots.get(name, {})))
        lines.append(f"  {name} {shape} {target}" + (f"  slots: {slots}" if slots else ""))
    if kinds.scope:
        lines.append(f"optimizer variables under {scope!r}:")
        lines += [f"  {name} ({use})" for name, use in sorted(kinds.scope.items())]
    matched = True
    if match is not None:
        leftover = match.describe_unmatched()
        matched = not leftover
        lines.append("left over: " + (leftover or "nothing; TFCheckpoint(strict=True) would load every name"))
    return lines, matched


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_optloss.tf_checkpoint",
        description="Look into a TF1 tf.train.Saver checkpoint before loading it with TFCheckpoint.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="variables, the mapping TFCheckpoint would apply, leftovers")
    inspect.add_argument("path", help="a checkpoint prefix (.../model.ckpt-4000) or a folder with TF's 'checkpoint'")
    inspect.add_argument("--module", help="pkg.module.Class of the torch module, built without arguments")
    inspect.add_argument("--name", default="OptimizeLoss", help="optimize_loss's name scope (default OptimizeLoss)")
    args = parser.parse_args(argv)
    try:
        prefix = resolve_prefix(_OWNER, args.path)
        module = load_module(args.module) if args.module else None
        lines, matched = report(prefix, module, args.name)
    except (OSError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if matched else 1
