"""Writing outputs: the record (``cdmoe.json``), the checkpoint writer (whole or streamed), the model card.
"""
