"""Build the one Cython extension, engine._fastpath, from cext/.

ENGINE_DEBUG=1 builds with Cython bounds checks and C asserts on (used by the
fuzz run); the default build is the fast one.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("ENGINE_DEBUG") == "1"
directives = {
    "language_level": "3",
    "boundscheck": debug,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": debug,
}
cflags = ["-O0", "-g", "-UNDEBUG"] if debug else ["-O3"]

ext = Extension(
    "engine._fastpath",
    ["cext/fastpath.pyx"],
    include_dirs=["cext"],
    extra_compile_args=cflags + ["-Wno-unused-function"],
)

setup(ext_modules=cythonize([ext], include_path=["cext"], compiler_directives=directives))
