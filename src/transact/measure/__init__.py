"""What a pruned model lost and gained: perplexity, costs (parameters, KV cache, FLOPs), task accuracy
(lm-eval), measured speed (bench), and the jobs and report behind ``eval``, ``bench`` and ``compare``."""
