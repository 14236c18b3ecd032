"""Checkpoint IO: safetensors, manifest, save and resolve, the reader, validation, memory mapping."""
