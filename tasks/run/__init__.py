"""Running a build: preflight checks, the recipes of the three flows, Ray stage actors and the shard
build with its manifest. The only tasks package that imports Prefect and Ray (lazily where it can).
"""
