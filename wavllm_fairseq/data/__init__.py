"""Data: manifests, audio reading, the chat template and tokenizers, the dataset and collater, the curriculum."""
