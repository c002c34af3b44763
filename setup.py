import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# MACE_DEBUG=1 builds without optimisation and with debug info, for chasing a fault in the
# hot loop with gdb or valgrind.
debug = os.environ.get("MACE_DEBUG") == "1"
cflags = ["-O0", "-g"] if debug else ["-O2"]
macros = [] if debug else [("NDEBUG", None)]

extensions = [
    Extension(
        name,
        [f"src/{name.replace('.', '/')}.pyx"],
        include_dirs=["src/mace/includes"],
        extra_compile_args=cflags,
        define_macros=macros,
    )
    for name in ("mace.capture._ring", "mace.correlate._correlate")
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
    )
)
