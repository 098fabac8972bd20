"""The ``>>>`` examples in the package's docstrings run and print what they show (part of ``make test``).

Every module of the package is searched; the entry modules (``python -m`` commands) and the demos have no
examples and are imported elsewhere. ``DOCUMENTED`` names the public functions that must keep an example, so
that an example deleted by mistake fails here instead of vanishing from the documentation site.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lightning_optloss

# Commands and demos: they parse arguments or train when run, and carry no examples.
SKIPPED = {
    "lightning_optloss.compare",
    "lightning_optloss.demo",
    "lightning_optloss.example",
    "lightning_optloss.mlflow_replay",
    "lightning_optloss.demos.demo",
    "lightning_optloss.demos.example",
}
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(lightning_optloss.__path__, prefix="lightning_optloss.")
    if info.name not in SKIPPED
)
DOCUMENTED = {
    "lightning_optloss.tf.configure": ["configure_optimizers"],
    "lightning_optloss.tf.decay": [
        "exponential_decay",
        "piecewise_constant",
        "polynomial_decay",
        "cosine_decay",
    ],
    "lightning_optloss.tf.warmup": ["linear_warmup", "warmup_cosine_decay"],
    "lightning_optloss.gradients.adaptive_clipping": ["adaptive_clipping_fn"],
    "lightning_optloss.gradients.agc": ["agc_clipping_fn"],
    "lightning_optloss.gradients.autoclip": ["autoclip_fn"],
    "lightning_optloss.gradients.noise_schedules": ["annealed_noise_scale"],
    "lightning_optloss.gradients.clipping": ["clip_by_global_norm_", "clip_groups_by_global_norm_"],
    "lightning_optloss.gradients.norms": ["parameter_norms"],
    "lightning_optloss.gradients.multipliers": ["multiply_"],
    "lightning_optloss.gradients.statistics": ["gradient_statistics"],
    "lightning_optloss.gradients.histograms": ["histogram_table"],
}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def examples(module_name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(module_name)
    found = doctest.DocTestFinder(exclude_empty=True).find(module, module_name)
    return [test for test in found if test.examples and test.name.startswith(module_name)]


def test_every_module_of_the_package_is_searched() -> None:
    # walk_packages must reach into the wings, or the examples below would silently not run.
    assert set(DOCUMENTED) <= set(MODULES)
    assert {"lightning_optloss.callback", "lightning_optloss.mlflow.logger"} <= set(MODULES)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name: str) -> None:
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    failures = []
    for test in examples(module_name):
        result = runner.run(test, out=failures.append)
        assert result.attempted == len(test.examples)
    assert not failures, "".join(failures)


@pytest.mark.parametrize("module_name", sorted(DOCUMENTED))
def test_public_functions_keep_their_examples(module_name: str) -> None:
    names = {test.name.removeprefix(module_name + ".") for test in examples(module_name)}
    missing = sorted(set(DOCUMENTED[module_name]) - names)
    assert not missing, f"{module_name}: no `>>>` example in the docstring of {missing}"
