"""Screening the input before it is planned: decontamination against evaluation prompts (word n-grams,
embedding cosine) and dedup over the whole input (normalised equality, MinHash LSH, optional embedding
cosine). `minhash` and `rules` are pure; `embed` holds the encoder (torch, loaded lazily)."""
