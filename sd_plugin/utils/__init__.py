"""Layer 0, plumbing every layer may use: the choice sets and value checks, the error types,
cross-process sums and maxima, the metric meter, the one batch reader, the device-side record of
non-finite losses, the version and the one-run-per-output-folder lock. Imports nothing of sd_plugin
outside this folder."""
