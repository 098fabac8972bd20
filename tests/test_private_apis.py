"""The private APIs of torch and DeepSpeed that the package uses, one adapter module each: each still exists
and still means what the adapter assumes. A failure names what an upgrade moved and the adapter to change."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from torch.distributed.device_mesh import DeviceMesh

from lightning_optloss.common import foreach
from lightning_optloss.distributed import _deepspeed_private, _torch_private


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"torch {torch.__version__} no longer has {dotted} ({error}); update {_torch_private.__name__}.")


@pytest.mark.parametrize("name", foreach.KERNELS)
def test_every_foreach_kernel_exists_and_is_the_one_named(name):
    private = f"_foreach_{name}"
    assert hasattr(torch, private), f"torch {torch.__version__} has no torch.{private}; update common/foreach.py"
    assert getattr(foreach, name) is getattr(torch, private)


def test_the_foreach_kernels_compute_what_the_transforms_assume():
    tensors = [torch.tensor([3.0, 4.0]), torch.tensor([-2.0])]
    torch.testing.assert_close(torch.stack(foreach.norm(tensors, 2)), torch.tensor([5.0, 2.0]))
    scaled = foreach.mul(tensors, 2.0)
    foreach.mul_(scaled, [torch.tensor(0.5), torch.tensor(3.0)])  # per-tensor 0-d factors, as AGC passes them
    torch.testing.assert_close(scaled[1], torch.tensor([-12.0]))
    foreach.add_(scaled, tensors, alpha=-1.0)
    torch.testing.assert_close(scaled[0], torch.zeros(2))
    torch.testing.assert_close(foreach.clamp_max(foreach.clamp_min(tensors, -1.0), 1.0)[0], torch.ones(2))
    half = [torch.tensor([3.0, 4.0], dtype=torch.bfloat16)]
    assert foreach.norm(half, 2, dtype=torch.float32)[0].dtype == torch.float32  # upcast reduction


def test_fsdp1_flat_parameter_internals_are_where_the_adapter_reads_them():
    _resolve(_torch_private.FSDP_TRAVERSAL)
    clean = _resolve(_torch_private.FSDP_CLEAN_NAME)
    assert clean("_fsdp_wrapped_module.layer._checkpoint_wrapped_module.weight") == "layer.weight"
    flat_param = importlib.import_module("torch.distributed.fsdp._flat_param")
    fields = getattr(flat_param, "_ShardParamInfo", None)
    assert fields is not None, f"torch {torch.__version__}: _flat_param._ShardParamInfo moved; update _torch_private"
    missing = [name for name in _torch_private.SHARD_INFO_FIELDS if name not in fields._fields]
    assert not missing, f"torch {torch.__version__}: _ShardParamInfo lost {missing}; update _torch_private"
    source = inspect.getsource(flat_param.FlatParameter)
    missing = [name for name in _torch_private.FLAT_PARAMETER_FIELDS if f"{name}:" not in source]
    assert not missing, f"torch {torch.__version__}: FlatParameter no longer declares {missing}; update _torch_private"


def test_device_mesh_can_still_be_flattened():
    assert callable(getattr(DeviceMesh, "_flatten", None)), (
        f"torch {torch.__version__}: {_torch_private.MESH_FLATTEN} is gone; update _torch_private.flattened_mesh_group"
    )


def test_deepspeed_accessors_and_zero3_attributes_are_where_the_adapter_reads_them():
    deepspeed = pytest.importorskip("deepspeed")
    utils = importlib.import_module("deepspeed.utils")
    for name in ("safe_get_full_grad", "safe_set_full_grad", "safe_get_local_grad", "safe_set_local_grad"):
        assert callable(getattr(utils, name, None)), f"DeepSpeed {deepspeed.__version__}: deepspeed.utils.{name} moved"
    source = inspect.getsource(importlib.import_module("deepspeed.runtime.zero.partition_parameters"))
    missing = [name for name in _deepspeed_private.PARTITION_ATTRIBUTES if f".{name} =" not in source]
    assert not missing, (
        f"DeepSpeed {deepspeed.__version__} no longer sets {missing} on ZeRO-3 parameters; update _deepspeed_private"
    )
