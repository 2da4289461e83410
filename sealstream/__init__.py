"""sealstream: the service's settings and the wiring that builds its parts from them."""
