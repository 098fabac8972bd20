"""Gradient transforms on plain tensors: noise, multipliers, the clip family, statistics and histograms.

Nothing here knows Lightning; each transform is testable on a list of tensors.
"""
