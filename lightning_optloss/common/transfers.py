"""The one place where lightning_optloss copies values from the device to the host.

On an accelerator a device-to-host copy waits for every queued kernel, so the callback makes exactly one,
on steps that log summaries, and none on the others. Every such copy goes through :func:`to_host`, and
:func:`add_transfer_hook` lets a test or a profiler see each one::

    seen = []
    handle = add_transfer_hook(lambda tensor: seen.append(tensor.numel()))
    trainer.fit(model)
    handle.remove()
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch.utils.hooks import RemovableHandle

TransferHook = Callable[[torch.Tensor], None]
_hooks: OrderedDict[int, TransferHook] = OrderedDict()  # RemovableHandle needs a weak-referenceable dict


def add_transfer_hook(hook: TransferHook) -> RemovableHandle:
    """Call ``hook(tensor)`` before every device-to-host copy lightning_optloss makes.

    Returns:
        A handle whose ``remove()`` unregisters the hook.
    """
    handle = RemovableHandle(_hooks)
    _hooks[handle.id] = hook
    return handle


def to_host(values: torch.Tensor) -> list[float]:
    """Copy a 1-d tensor to the host as Python floats (one transfer, counted by the hooks)."""
    for hook in list(_hooks.values()):
        hook(values)
    return values.detach().to("cpu", torch.float64).tolist()
