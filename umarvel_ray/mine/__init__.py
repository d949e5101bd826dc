"""Step `mine_negatives`: hard negatives from each query's retrieved top-k."""
