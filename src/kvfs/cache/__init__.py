"""The resolver: object versions as immutable bytes, fetched once, shared and refreshed."""
