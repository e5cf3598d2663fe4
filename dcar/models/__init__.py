"""Models: the DC-HT tokenizer and the DC-AR generator."""
