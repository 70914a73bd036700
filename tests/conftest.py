import os

# No GPU on the test machines: Triton kernels run under its interpreter. Triton reads this when a
# kernel is defined, so it must be set before any test module imports one.
os.environ.setdefault("TRITON_INTERPRET", "1")
