"""Packed model format: encodings, sign planes, Hugging Face conversion, loading."""
