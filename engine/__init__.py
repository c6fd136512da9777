"""The trading domain of shardex: pure Python, numpy and the standard library only.

Nothing here imports a framework or reads a clock; time is always passed in (``ts_us``).
"""
