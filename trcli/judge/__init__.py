"""LLM and reward-model judges: endpoint client, cache, prompts, statistics, local backends."""
