"""The report layer: round and turn metrics with bootstrap intervals, the decoder audit, plots and the
HTML page, from run directories and public tables."""

N_RESAMPLES = 10_000  # bootstrap resamples per interval (the command line's default too)
