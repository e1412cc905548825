"""The CD-MoE search: calibration data, the layer runner, divergences, fixed gates (Eq. 2), greedy
experts (Algorithm 1), greedy layers (Algorithm 2), the ablation selectors and resumable state.
"""
