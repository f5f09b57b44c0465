"""Backends: target groups and strategies, target health (active and passive), retries."""
