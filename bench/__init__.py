"""Benchmarks of dbtunneld (run with ./dev bench or python -m bench.<module>)."""
