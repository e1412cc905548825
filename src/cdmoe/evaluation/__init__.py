"""Measuring a model: held-out perplexity, lm-evaluation-harness, measured memory, plots.
"""
