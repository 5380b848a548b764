"""Results to tables: the run store, statistics, rendering and figures, built from stored records alone."""
