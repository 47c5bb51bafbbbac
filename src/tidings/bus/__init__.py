"""Delivery of events to online devices behind the `Bus` interface (see base.py)."""
