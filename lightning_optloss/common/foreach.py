"""torch's ``torch._foreach_*`` kernels, the one private torch API the transforms and optimizers use.

They apply one operation to a list of tensors in one kernel launch per device and dtype (what torch's own
optimizers use), and are not public API. Every module calls them through these names; when a torch upgrade
moves or renames one, ``tests/test_private_apis.py`` fails naming it, and only this module changes.
"""

from __future__ import annotations

import torch

add = torch._foreach_add
add_ = torch._foreach_add_
clamp_max = torch._foreach_clamp_max
clamp_min = torch._foreach_clamp_min
copy_ = torch._foreach_copy_
div_ = torch._foreach_div_
mul = torch._foreach_mul
mul_ = torch._foreach_mul_
norm = torch._foreach_norm
pow = torch._foreach_pow
rsqrt = torch._foreach_rsqrt
sqrt = torch._foreach_sqrt
sqrt_ = torch._foreach_sqrt_
sub = torch._foreach_sub
sub_ = torch._foreach_sub_

KERNELS = (
    "add",
    "add_",
    "clamp_max",
    "clamp_min",
    "copy_",
    "div_",
    "mul",
    "mul_",
    "norm",
    "pow",
    "rsqrt",
    "sqrt",
    "sqrt_",
    "sub",
    "sub_",
)
"""The names above, each ``torch._foreach_<name>``."""
