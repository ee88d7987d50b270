"""One module per model family (Llama, BLOOM, ...); each exposes the same small interface."""
