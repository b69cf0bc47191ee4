"""Identity: face and voice embeddings, and the gallery of enrolled people."""
