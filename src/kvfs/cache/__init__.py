"""The object cache: versions as immutable bytes, fetched once, shared and refreshed (see resolver.py)."""
