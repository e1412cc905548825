"""Methods that turn a model into an output directory: CD-MoE (condense, apply, fine-tune), its
ablations, and the baselines (Layer/Block Drop, Expert Drop, M-SMoE, Expert Slimming).
"""
