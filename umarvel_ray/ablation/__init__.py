"""Ablations that chain several steps (mine -> train -> evaluate) per variant; floor 5 beside the recipe."""
