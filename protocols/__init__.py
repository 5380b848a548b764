"""What is run and how it is scored: protocol YAMLs, their schema, the runner and the metrics."""
