"""One module per stage; each exposes `run(recipe, registry, ...)` and meets the others only through the registry."""
