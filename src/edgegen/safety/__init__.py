"""Safety layer (torch-free): training-set hash index and memorization audit, watermarking."""
