"""Who talks to the control plane, and how it proves itself: the xDS server's own TLS (``xds_tls``)."""
