"""Datasets, TALLRec-style samples and client partitioning."""
