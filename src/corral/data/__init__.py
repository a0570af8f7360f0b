"""Datasets: reading every source format into one `Record`, then turning records into tensors."""
