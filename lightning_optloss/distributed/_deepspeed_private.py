"""Every DeepSpeed name beyond its documented ``deepspeed.utils`` accessors that the strategies use.

ZeRO-3 partitions carry ``ds_*`` attributes (``ds_tensor``, ``ds_numel``, ``ds_shape``, ``ds_process_group``)
that DeepSpeed documents nowhere; the strategies read them only through these functions. When a DeepSpeed
upgrade moves one, ``tests/test_private_apis.py`` fails naming it, and only this module changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PARTITION_ATTRIBUTES = ("ds_tensor", "ds_numel", "ds_shape", "ds_process_group")
"""The ZeRO-3 attributes of a partitioned parameter read here (set by ``deepspeed.runtime.zero``)."""


def full_numel(param: nn.Parameter) -> int:
    """The number of elements of the whole parameter (ZeRO-3 leaves an empty placeholder in the module)."""
    return getattr(param, "ds_numel", param.numel())


def full_shape(param: nn.Parameter) -> torch.Size:
    """The shape of the whole ZeRO-3 parameter."""
    return param.ds_shape


def partition(param: nn.Parameter) -> torch.Tensor:
    """This process's (padded) ZeRO-3 partition of the parameter's values."""
    return param.ds_tensor


def partition_size(param: nn.Parameter) -> int:
    """The padded size of each process's ZeRO-3 partition of the parameter."""
    return param.ds_tensor.ds_numel


def process_group(param: nn.Parameter) -> Any:
    """The processes over which the ZeRO-3 parameter is partitioned."""
    return param.ds_process_group
