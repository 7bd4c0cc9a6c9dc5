"""Generation from a trained transformer: sample with CLIP reranking, evaluate, decode token shards."""
