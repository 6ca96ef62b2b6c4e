"""Evaluation: per-task scoring of fairseq-generate output, t-SNE of the prompt adapter's outputs."""
