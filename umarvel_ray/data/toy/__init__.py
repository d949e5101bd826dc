"""The toy M-BEIR benchmark: a seeded fixture generator (`builder`) and its scene vocabulary
(`scenes`), kept apart from the real M-BEIR IO in `umarvel_ray.data`."""
