"""Reading and writing on the user's behalf: output directories that never lose data, the trust decision.

The lowest stage: imports nothing of cdmoe but :mod:`cdmoe.errors`.
"""
