"""Gradient transforms on plain tensors: noise, multipliers, the clip family, statistics and histograms.

Nothing here knows Lightning or the strategies; each transform is testable on a list of tensors. Every clipping
follows one contract, :class:`~lightning_optloss.gradients.contract.ClipTransform`, and the sharding a
transform must know is the :class:`~lightning_optloss.gradients.contract.Layout` protocol that
:mod:`lightning_optloss.distributed` implements.
"""
