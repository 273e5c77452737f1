"""Weights on disk: reading release checkpoints, the quantised format, writing, converting.

Imports nothing from the runtime or the kernels: the converter needs key names and
shapes (``layout``), not model code.
"""
