"""Training: the synthetic captioned world, its judge, and the training loops."""
