"""Units of work for dafactory flows.

Pure cores (config, schemas, prompts, selection, storage helpers, the refusal heuristic, the fake
backend) import neither Prefect, Ray nor torch. Heavy pieces (Ray actors, transformers backends) live in
their own modules and import those libraries lazily.
"""
