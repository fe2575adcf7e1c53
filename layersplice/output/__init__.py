"""Executing plans into checkpoints: shards, index, config, provenance
(layersplice.json, manifest.json), and verifying them afterwards."""
