"""xDS: naming, generators, the resource cache and the ADS server."""
