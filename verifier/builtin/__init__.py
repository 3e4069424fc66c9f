"""Built-in verifiers: math, code, ifeval, exact, regex."""
