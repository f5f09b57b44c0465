"""The HTTP/1.1 layer: per-request routing, reverse proxy, redirect, static, upgrades."""
