"""Methods side by side: ``cdmoe compare`` at matched budgets, ``cdmoe sweep`` over N, ``cdmoe report``.
"""
