"""Built-in verifiers: math, code, ifeval, exact, regex, reasoning_gym."""
