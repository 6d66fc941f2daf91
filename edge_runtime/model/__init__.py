"""Model semantics: configuration, decoder loop, sampling, tokenizer, generation."""
