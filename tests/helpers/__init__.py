"""What the tests share besides fixtures (those are in tests/conftest.py): builders and constants, one module per
noun. Tests import them as `from helpers.<module> import ...`: pytest puts tests/ on sys.path (tests/ has no
__init__.py); a subprocess script puts `helpers.cli.TESTS` there itself."""
