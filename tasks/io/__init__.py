"""Input and output: prompt files, Arrow schemas, dataset folders (local or S3), manifests, verify, redaction.

Pure: imports neither Prefect, Ray nor torch. Imports only the ground floor (config, errors).
"""
