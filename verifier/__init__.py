"""Verifier service: scores samples (math, sandboxed code, IFEval, exact, regex, plug-ins)."""
