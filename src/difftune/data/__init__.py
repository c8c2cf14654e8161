"""The data stage: examples, transforms and batch order. Replaceable as a whole."""
