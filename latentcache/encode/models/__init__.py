"""The models a run loads: the VAE (its family record, what a --vae names, loading, encoding, the out-of-memory
policy, provenance) and the optional text encoder for prompt embeddings."""
