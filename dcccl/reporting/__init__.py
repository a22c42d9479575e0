"""What a person reads: result tables, plots, the comparison report, Weights & Biases."""
