"""Units of work for dafactory flows, grouped by the stage of the pipeline they serve.

Imports go one way: run -> distill, evaluate -> score -> generate -> io -> ground floor (config, errors,
registry), and the ground floor imports nothing of ours. Pure cores import neither Prefect, Ray nor torch;
heavy pieces (Ray actors, transformers backends) import those libraries lazily.
"""
