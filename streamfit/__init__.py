"""The ``streamfit`` command line: the entry point that starts each part.

No other package imports this one.
"""
