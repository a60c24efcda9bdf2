"""Command line: `ascend-patch validate | plan | doctor`, and the offline vLLM runner."""
