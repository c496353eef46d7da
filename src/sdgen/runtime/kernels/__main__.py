"""`python -m sdgen.runtime.kernels`: build the compiled kernels now (make setup runs it) and say so."""

from sdgen.runtime.kernels import attention_kernel, cache_folder, unavailable_reason

if attention_kernel() is None:
    print(f"sdgen: no compiled kernels here ({unavailable_reason() or 'the build failed'}); "
          "the fast paths use PyTorch's operations")
else:
    print(f"sdgen: CPU kernels ready in {cache_folder()}")
