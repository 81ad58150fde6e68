"""XRDMatch: augmentations, networks, semi-supervised training, ensembles, evaluation."""
