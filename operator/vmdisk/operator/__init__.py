"""The kopf adapter: thin handlers from Kubernetes events to the engine and back.

Only this package imports kopf.
"""
