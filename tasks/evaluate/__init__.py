"""Evaluation stages: benchmark loading, utility sets (GSM8K, MMLU) and the Markdown/PNG report.

Imports score, generate, io and the ground floor.
"""
