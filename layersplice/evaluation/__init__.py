"""How good each size is: sizes assembled in memory, perplexity, the KL patch
order, lm-eval tasks, reports and plots, and the built-in stdlib texts."""
