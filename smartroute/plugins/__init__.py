"""External plugins: programs in any language that smartroute starts, supervises and asks, as
hooks, over a Unix socket (the wire protocol is in the README, "Plugins")."""
