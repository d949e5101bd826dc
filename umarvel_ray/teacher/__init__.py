"""Step `teacher_scores`: re-ranker P(Yes) over each query's local top-k, for distillation."""
