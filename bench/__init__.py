"""Benchmarks of vmdisk against the bare tools it drives (``make bench``)."""
