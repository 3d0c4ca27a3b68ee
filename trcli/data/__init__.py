"""Datasets: readers for input files, one converter per source, canonical records."""
