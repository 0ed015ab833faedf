"""Distillation stages: the safety spec, teacher prompts and reasoning parsing, filtering, dedup and
decontamination. Imports score, generate, io and the ground floor.
"""
