"""Build the Cython extensions in src/fastpipe/_native/.

The extensions are required: a failed build fails the install. FASTPIPE_NO_EXTENSIONS=1 at
run time (not here) makes fastpipe use the plain-Python twins, for debugging only.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

NATIVE = ["_scan", "_cdc"]

extensions = [
    Extension(
        f"fastpipe._native.{name}",
        [f"src/fastpipe/_native/{name}.pyx"],
        extra_compile_args=["-O3"],
    )
    for name in NATIVE
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
