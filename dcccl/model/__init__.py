"""The method itself: the served model (summed logits), the losses, freezing guides, the vertical split."""
