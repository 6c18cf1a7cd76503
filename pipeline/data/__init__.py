"""Datasets: loading source files, converting instruct formats to conversations, chat templates, rendering."""
