"""Command line: `ascend-patch validate | plan | doctor | schema | tiny-model | ab`, argument
parsing and dispatch only (the work is in core, checks, ab, harness and, for `ab --layer`, lab).

Everything below a subcommand is imported when it runs: building the parser must not import
torch or vLLM."""
