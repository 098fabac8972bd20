"""Everything OptimizeLoss knows about Lightning's strategies lives here.

The callback asks this module for a :class:`GradientAccess` and never looks at the strategy itself: how to
reach the gradients a process holds, and how to sum a tensor over the processes that share a parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    Strategy,
    XLAStrategy,
)
from torch import Tensor, nn

from lightning_optloss.transforms import AllReduceSum


class GradientAccess:
    """Gradients held whole by every process: one device, or DDP (where they are already averaged).

    Attributes:
        all_reduce_sum: Sums a tensor over the processes that hold shards of the same parameters; ``None``
            when every process holds whole gradients, so norms need no collective.
    """

    all_reduce_sum: AllReduceSum | None = None

    def grads(self, params: Sequence[nn.Parameter]) -> list[Tensor | None]:
        """The gradient tensors to read and modify in place (``None`` where a parameter got none)."""
        return [param.grad for param in params]


def gradient_access(owner: str, strategy: Strategy) -> GradientAccess:
    """The :class:`GradientAccess` for ``strategy``, or an error naming what is supported."""
    unsupported_subclasses = (DeepSpeedStrategy, XLAStrategy, SingleDeviceXLAStrategy)
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, unsupported_subclasses):
        return GradientAccess()
    raise ValueError(
        f"{owner}: the Trainer's strategy is {type(strategy).__name__}, which this version of "
        "lightning_optloss "
        "does not support yet; supported: single device ('auto' on one device), 'ddp', 'ddp_spawn' and "
        "'ddp_find_unused_parameters_true'. It refuses rather than clipping or logging wrong values."
    )
