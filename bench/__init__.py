"""Benchmarks run by ``shardex bench``; each prints side-by-side figures and a final JSON line."""
