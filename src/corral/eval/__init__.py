"""`corral eval`: measure a model on held-out data, perplexity and multiple-choice benchmarks.

generate/ppl share their core with evaluation at the end of training (`corral.infer.evaluate`);
`mc` scores MMLU-style benchmarks; `compare` puts runs side by side.
"""
