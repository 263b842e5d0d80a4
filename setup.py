"""Build the Cython extensions from cext/: engine._fastpath (the fast path) and
engine._dnsio (the cluster DNS's batched UDP I/O).

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

# batched UDP I/O of the cluster DNS (recvmmsg/sendmmsg); optional at run time
dnsio = Extension("engine._dnsio", ["cext/dnsio.pyx"], extra_compile_args=cflags + ["-Wno-unused-function"])

setup(ext_modules=cythonize([ext, dnsio], include_path=["cext"], compiler_directives=directives))
