"""Pure check logic: measurements in, verdicts out. No pytest, no process management."""
