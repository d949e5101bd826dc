"""The re-ranker's Ray Data pair-scoring job, shared by the teacher and the evaluation's reranking.

    offsets.py   scan_offsets / read_at: jsonl lines by byte range (only the lines scored are read)
    pairs.py     decode_pairs: CPU tasks, query row (byte ranges) -> one row per (query, candidate)
    actor.py     RerankActor: one `Reranker.load` per actor, P(Yes) per pair; pixel budget; GPU mode
    config.py    PairPoolConfig (decode / actor pool settings), RerankModel (which re-ranker)
    pipeline.py  score_pairs: decode tasks -> actor pool, every output batch handed to the caller

Floor 3: it builds items with `data.rows.parse_row` (the embedding pipeline's own parser, so a
query is rendered with the same text rule and seeded instruction) and never imports embed/train.
"""
