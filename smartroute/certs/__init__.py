"""Certificates: the store, the ACME client, TLS-ALPN-01 and the certificate manager."""
