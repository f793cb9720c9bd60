"""One module per paper. Each registers itself with :func:`raylab.registry.register_method`."""
