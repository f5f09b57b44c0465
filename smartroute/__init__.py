"""smartroute: an asyncio connection-routing proxy."""
