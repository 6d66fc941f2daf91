"""CUDA launchers, one module per kernels/<op>.cu, sharing common.py (module loading, argument checks,
DeviceMatrix, the step-buffer layout)."""
