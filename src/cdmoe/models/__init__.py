"""Models: MoE family specs as data, the MoE block view (Eq. 1), the condensed layer (Eq. 3), loading,
parameter accounting, storage dtypes, and the modelling file shipped in every cdmoe-format checkpoint.

Imports only :mod:`cdmoe.io`.
"""
