"""The admin HTTP surface (aiohttp): health and readiness now; metrics and debug views later."""
