"""Evaluation: streaming metrics, plots and reports."""
