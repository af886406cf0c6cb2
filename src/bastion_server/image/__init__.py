"""The sandbox image: a minimal Debian root filesystem, built once per machine.

See :mod:`bastion_server.image.builder` for the layout and the build steps.
"""

from bastion_server.image.builder import (
    BUILDER_VERSION,
    DEFAULT_IMAGES_DIR,
    DEFAULT_RECIPE,
    RECIPES,
    ImageBuildError,
    ImageError,
    ImageInfo,
    ImageNotBuiltError,
    ImageRecipe,
    build_image,
    default_images_dir,
    resolve_image,
    shift_ownership,
)

__all__ = [
    "BUILDER_VERSION",
    "DEFAULT_IMAGES_DIR",
    "DEFAULT_RECIPE",
    "RECIPES",
    "ImageBuildError",
    "ImageError",
    "ImageInfo",
    "ImageNotBuiltError",
    "ImageRecipe",
    "build_image",
    "default_images_dir",
    "resolve_image",
    "shift_ownership",
]
