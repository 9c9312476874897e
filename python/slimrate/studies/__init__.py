"""Studies that compare methods under equal budgets; each writes tables and plots to bench/results/."""
