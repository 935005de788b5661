"""Build step for runner_spawn_activate.pth (the rest of the metadata is in pyproject.toml).

A ``.pth`` file works only at the top of site-packages, outside any package, so
``build_py`` copies it there: into the build tree for a wheel, and into the unpacked
wheel that an editable install (PEP 660) writes, whose build tree is thrown away.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = Path("src", "runner_spawn_activate.pth")


class BuildPyWithPth(build_py):
    """build_py, plus the activation ``.pth`` at the top of what gets installed."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            # setuptools' editable_wheel points install_lib at the wheel it is writing.
            target = Path(self.get_finalized_command("install").install_lib, PTH.name)
        else:
            target = Path(self.build_lib, PTH.name)
        self.copy_file(str(PTH), str(target), preserve_mode=False)


setup(cmdclass={"build_py": BuildPyWithPth})
