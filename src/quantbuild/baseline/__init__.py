"""The bundled baseline: its tokenizer, its model definition and its training loop."""
