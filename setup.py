"""The optional compiled cast (layersplice/checkpoint/_fastcast.c).

Everything else about the package is in pyproject.toml. Where no C compiler or
Python headers are present, the extension is skipped with a warning and casts
use numpy: same bytes, slower.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptimizingBuildExt(build_ext):
    """-O3 where the compiler takes it: the loop only vectorizes at -O3 on GCC 12."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":
            for extension in self.extensions:
                extension.extra_compile_args = ["-O3", *extension.extra_compile_args]
        super().build_extensions()


setup(
    ext_modules=[
        Extension("layersplice.checkpoint._fastcast", ["layersplice/checkpoint/_fastcast.c"], optional=True),
    ],
    cmdclass={"build_ext": OptimizingBuildExt},
)
