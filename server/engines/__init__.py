"""Delivery engines: the direct engine (MX lookup) and smarthosts."""
