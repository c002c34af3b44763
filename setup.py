import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# MACE_DEBUG=1 builds without optimisation, with debug info and with the invariant checks
# of includes/mace_debug.h (MACE_ASSERT), for chasing a fault in the hot loop; the modules
# then say so (`_ring.DEBUG`).  The unit tests run on such a build too (test_debug_build).
debug = os.environ.get("MACE_DEBUG") == "1"
cflags = ["-O0", "-g"] if debug else ["-O2"]
macros = [("MACE_DEBUG", "1")] if debug else [("NDEBUG", None)]

extensions = [
    Extension(
        name,
        [f"src/{name.replace('.', '/')}.pyx"],
        include_dirs=["src/mace/includes"],
        extra_compile_args=cflags,
        define_macros=macros,
    )
    for name in ("mace.capture._ring", "mace.correlate._correlate", "mace.output._format")
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
    )
)
