"""The toy world: the offline tiny model and the bundled synthetic tasks."""
