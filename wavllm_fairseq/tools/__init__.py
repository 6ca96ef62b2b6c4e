"""Converters and inspectors behind the console scripts (checkpoints, manifests, backbones, parameter counts)."""
