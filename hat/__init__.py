"""HAT: Hierarchical Alignment Transformers for image-text retrieval."""
