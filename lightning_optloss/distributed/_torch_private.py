"""Every private name of ``torch.distributed`` that the strategies use, in one place.

FSDP1 (``FSDPStrategy``) hides each original parameter's shard inside a flat parameter and exposes no public
API for where it lies; FSDP2 meshes sharded on several dimensions need a flattened sub-mesh. When a torch
upgrade moves one of these, ``tests/test_private_apis.py`` fails naming it, and only this module changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

FSDP_TRAVERSAL = "torch.distributed.fsdp._traversal_utils._get_fsdp_handles"
FSDP_CLEAN_NAME = "torch.distributed.fsdp._common_utils.clean_tensor_name"
FLAT_PARAMETER_FIELDS = ("_params", "_shapes", "_shard_param_infos")
SHARD_INFO_FIELDS = ("in_shard", "offset_in_shard", "intra_param_start_idx", "intra_param_end_idx")
MESH_FLATTEN = "DeviceMesh._flatten"


@dataclass(frozen=True)
class FlatShard:
    """Where one original parameter's shard lies in its FSDP1 flat parameter on this process.

    ``start``/``stop``: the range of the flattened parameter held here (equal when none); ``offset``: where that
    range begins in the local shard of ``flat_param`` (None when this process holds none of it).
    """

    param: nn.Parameter
    shape: torch.Size
    flat_param: nn.Parameter
    start: int
    stop: int
    offset: int | None
    process_group: Any


def fsdp_flat_shards(model: nn.Module) -> Iterator[FlatShard]:
    """The shard of every original parameter of the sharded FSDP1 units of ``model`` (``NO_SHARD`` ones skipped)."""
    from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles

    for handle in _get_fsdp_handles(model):
        if not handle.uses_sharded_strategy:
            continue
        flat_param = handle.flat_param
        infos = zip(flat_param._params, flat_param._shapes, flat_param._shard_param_infos, strict=True)
        for param, shape, info in infos:
            if info.in_shard:
                start, stop, offset = info.intra_param_start_idx, info.intra_param_end_idx + 1, info.offset_in_shard
            else:
                start = stop = 0
                offset = None
            yield FlatShard(param, shape, flat_param, start, stop, offset, handle.process_group)


def fsdp_parameter_name(name: str) -> str:
    """A parameter name without FSDP1's wrapper prefixes."""
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    return clean_tensor_name(name)


def flattened_mesh_group(mesh: DeviceMesh, names: tuple[str, ...]) -> Any:
    """The process group of the sub-mesh ``mesh[names]`` flattened into one dimension."""
    return mesh[names]._flatten().get_group()
