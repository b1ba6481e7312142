"""Training the heads: dataset readers, augmentation, the frozen-backbone and end-to-end loops, and the
``train`` / ``segment`` CLI commands."""
