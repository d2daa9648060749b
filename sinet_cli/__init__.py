"""sinet: find and down-weight mislabeled images with side information (SINet, ECCV 2020)."""
