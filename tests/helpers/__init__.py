"""Test infrastructure shared by several test modules (servers, processes), imported by conftest.py."""
