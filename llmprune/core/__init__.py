"""Maths kernels on plain tensors: sparsity patterns and masks, calibration statistics, the damped
factorisation of a Hessian. No models, no files."""
