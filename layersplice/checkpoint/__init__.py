"""Bytes on disk: safetensors headers, checkpoint resolution, shard writing, atomic output.

Nothing in this package knows about layers.
"""
