"""The adapter archive (store.py) and its command line (`python -m pipeline.archive`)."""
