"""Moving kept rows to their experts' ranks and the results back (vLLM's kernel only wraps it)."""
