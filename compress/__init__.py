"""ROCKET compression: calibration hooks, whitening, factorization, profiling and knapsack allocation."""
