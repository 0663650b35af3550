"""Engines: *what* runs (ipyparallel or Dask), independent of where it runs."""
