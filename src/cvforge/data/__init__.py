"""Data: readers for each format, the built-in data set, transforms and loaders."""
