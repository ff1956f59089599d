"""Evaluation metrics for the paper's fine-tuning tasks."""
