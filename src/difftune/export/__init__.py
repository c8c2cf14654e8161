"""Writing results: model cards and adapter metadata."""
